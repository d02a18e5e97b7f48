"""Pure tensor math: nearest Kronecker products, whitening, output metrics, permutation search."""
