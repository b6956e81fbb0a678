"""`boxpark image build|export|import`: the guest image, built here or carried as a bundle to a Mac.

The builder (`boxpark.image`) loads only for these commands. It is optional at run time (a Mac cannot
build): without it the commands still parse, and fail when they run.
"""

from __future__ import annotations

import argparse


def add_arguments(name: str, image: argparse.ArgumentParser) -> None:
    image.description = "Build and manage guest images."
    image_commands = image.add_subparsers(dest="image_command", metavar="SUBCOMMAND", required=True)
    image_build = image_commands.add_parser("build", help="build the guest image (cached by its inputs)",
                                            description="Build the guest image: kernel, initramfs, squashfs "
                                                        "root and manifest, from Debian packages.")
    image_export = image_commands.add_parser(
        "export", help="write an image as one bundle file (for a host that cannot build it)",
        description="Write the image (kernel, initramfs, root, manifest) as a bundle: a tar with the sha256 "
                    "of each file.")
    image_import = image_commands.add_parser(
        "import", help="verify and install an image bundle (a file or an http(s)/file URL)",
        description="Verify every file of a bundle against its sha256 and install the image atomically.")
    try:
        from ..image import build
    except ImportError:
        pass
    else:
        build.add_arguments(image_build)
    try:
        from ..image import bundle
    except ImportError:
        pass
    else:
        bundle.add_export_arguments(image_export)
        bundle.add_import_arguments(image_import)
    image_build.set_defaults(func=_image_build)
    image_export.set_defaults(func=_image_export)
    image_import.set_defaults(func=_image_import)


def _image_build(args: argparse.Namespace) -> int:
    from ..image import build

    return build.run(args)


def _image_export(args: argparse.Namespace) -> int:
    from ..image import bundle

    return bundle.run_export(args)


def _image_import(args: argparse.Namespace) -> int:
    from ..image import bundle

    return bundle.run_import(args)
