"""Genie on Ray (``pip install genie[ray]``): ``ServerPool`` starts and supervises genie servers as
Ray actors in a placement group; ``genie.connect(pool.addresses, token=pool.token)`` uses them."""

from genie.ray._pool import ServerPool

__all__ = ["ServerPool"]
