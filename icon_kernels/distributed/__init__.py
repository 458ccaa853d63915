"""``ik.distributed``: the I-Con loss over a batch sharded across processes (torch.distributed).

``entry.py`` is the entry point (gather and ring modes); ``rank_agreement.py`` checks that every
rank passes the same options before any data moves; ``ring.py`` rotates column blocks between
the ranks: it is the stream of ``backends/column_stream.py``, whose autograd function runs the
passes (``backends/column_blocks.py`` merges the row statistics, ``backends/label_blocks.py`` runs
the hot Labels case on the fused CPU kernel). The torch backend uses the same stream on one
process for joint normalisation and symmetrised targets.
"""
from .entry import icon_loss

__all__ = ["icon_loss"]
