"""One notebook's study each: what it measures, built from techniques, with the original paper's reference figures."""
