"""Where things are, for tests that run scripts or read files (no MXNet import)."""
import os

#: The checkout's top folder.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: The steering repo's shared folder beside the checkout (may be absent).
SHARED = os.path.join(ROOT, "..", "shared")
