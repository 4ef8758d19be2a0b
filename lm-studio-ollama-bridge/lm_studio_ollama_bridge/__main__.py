from lm_studio_ollama_bridge.cli import main

main()
