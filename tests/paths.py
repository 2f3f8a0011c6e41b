"""Where things are, for tests that run scripts or read files (no MXNet import)."""
import os

#: The checkout's top folder.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: The steering repo's shared folder beside the checkout, or beside the folder of worktrees
#: (may be absent).
SHARED = next((path for path in (os.path.join(ROOT, "..", "shared"), os.path.join(ROOT, "..", "..", "shared"))
               if os.path.isdir(path)), os.path.join(ROOT, "..", "shared"))
