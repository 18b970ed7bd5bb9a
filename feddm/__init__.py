"""Entry points that tie the ServerApp and the ClientApp together (simulation, CLIs).

``server_app`` and ``client_app`` never import each other; this package is where
both meet, as Flower's own simulation engine does.
"""
