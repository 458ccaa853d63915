"""``ik.distributed``: the I-Con loss over a batch sharded across processes (torch.distributed).

``entry.py`` is the entry point (gather and ring modes); ``rank_agreement.py`` checks that every
rank passes the same options before any data moves; ``ring.py`` rotates column blocks,
``column_blocks.py`` merges their row statistics and ``label_blocks.py`` runs the hot Labels case
on the fused CPU kernel.
"""
from .entry import icon_loss

__all__ = ["icon_loss"]
