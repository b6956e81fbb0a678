"""The guest image builder: kernel, initramfs, squashfs root and manifest, cached by their inputs.

`build_image()` is the API (and `build.add_arguments` / `build.run` the `boxpark image build` command);
docs/image.md describes the image and the contract with the guest's init. Host-side only: the guest
never imports this package.
"""

from .build import build_image, cache_dir, default_image_dir
from .subp import BuildError  # noqa: F401

__all__ = ["BuildError", "build_image", "cache_dir", "default_image_dir"]
