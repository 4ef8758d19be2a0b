"""Peers: other stacks and servers whose models this stack serves too (docs/peers.md).
shared/peers.py reads their settings; registry.py asks each what it has and whether it is
up; pick.py decides which serves a request; forward.py relays a request to one."""
