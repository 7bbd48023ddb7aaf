"""Install the torchvision start-up shim into an environment's site-packages (idempotent).

    python tools/install_shim.py            # into the running interpreter's site-packages
    python tools/install_shim.py DIRECTORY  # into DIRECTORY (tests)

Copies tools/_upvit_torchvision_shim.py and tools/upvit-torchvision-shim.pth; running it again
rewrites the same two files.
"""
import os
import shutil
import sys
import sysconfig

HERE = os.path.dirname(os.path.abspath(__file__))
FILES = ("_upvit_torchvision_shim.py", "upvit-torchvision-shim.pth")


def install(target: str) -> list[str]:
    os.makedirs(target, exist_ok=True)
    written = []
    for name in FILES:
        shutil.copyfile(os.path.join(HERE, name), os.path.join(target, name))
        written.append(os.path.join(target, name))
    return written


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else sysconfig.get_paths()["purelib"]
    for path in install(target):
        print(f"installed {path}")
