"""What CORE-MTL claims and how to measure it: closed forms, gradient balancing, simulated training, checks."""
