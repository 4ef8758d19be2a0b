// The Node `openai` SDK against the stack (tests/test_openai_models.py runs it):
// models.list, models.retrieve (an id, an alias, an unknown name) and the
// responses.stream() helper. Prints one JSON object with what it saw.
// usage: NODE_PATH=<dir>/node_modules node node_openai.cjs <base url> <model> <alias>
const OpenAI = require("openai");

async function main() {
  const [baseURL, model, alias] = process.argv.slice(2);
  const client = new OpenAI({ baseURL, apiKey: "unused", maxRetries: 0 });
  const out = {};
  out.listed = [];
  for await (const m of client.models.list()) out.listed.push(m.id);
  out.retrieved = await client.models.retrieve(model);
  out.byAlias = (await client.models.retrieve(alias)).id;
  try {
    await client.models.retrieve("ms/nope:1b");
    out.unknown = "no error";
  } catch (e) {
    out.unknown = { status: e.status, error: e.error, notFound: e instanceof OpenAI.NotFoundError };
  }
  // the stream helper: its accumulator iterates the response's `output`
  const stream = client.responses.stream({
    model, input: "hi", max_output_tokens: 8, grammar: "root ::= [a-z ]+",
  });
  out.events = [];
  let deltas = "";
  for await (const event of stream) {
    out.events.push(event.type);
    if (event.type === "response.output_text.delta") deltas += event.delta;
  }
  const final = await stream.finalResponse();
  out.deltas = deltas;
  out.final = { model: final.model, status: final.status, text: final.output_text };
  console.log(JSON.stringify(out));
}

main().catch((e) => {
  console.error(e && e.stack ? e.stack : e);
  process.exit(1);
});
