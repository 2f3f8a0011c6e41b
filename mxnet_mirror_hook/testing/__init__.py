"""Networks for tests, benchmarks and examples (not part of the planning API).

:mod:`.models` builds small symbols (residual, Inception-style, U-Net, the
memonger ResNet) and gluoncv networks traced to symbols, all from random
weights: nothing is downloaded.
"""
