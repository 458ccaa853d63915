"""Target builders: kNN graphs and propagation (``knn.py``), perplexity-calibrated Gaussian
bandwidths (``perplexity.py``), and the row-chunked pairwise distances they share
(``pair_blocks.py``)."""
