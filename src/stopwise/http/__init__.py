"""HTTP plumbing every stopwise server shares (body limits, JSON reading, error bodies).

Plain ASGI and the standard library, so the chat server (``stopwise.sampling``) and the encoder
server (``stopwise.serve``) use one implementation without importing each other.
"""
