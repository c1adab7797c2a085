"""Synthetic data with known truth: LC25000-layout tiles (`synthetic.tiles`) and whole slides (`synthetic.slides`).

Data, not training: the tests, the load tests and training all draw on it.
"""
