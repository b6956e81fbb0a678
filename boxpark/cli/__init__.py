"""The `boxpark` command: the table of its commands, the lazy parser, and the one place errors are shown.

Each command group lives in a module of this package (`machine`: up, down, status, exec, shell, logs;
`guest`, `image`, `vz`, `boot`, `agent`, `config`), and a group's module is imported only when its command
is parsed: `boxpark --help` imports none of them, `boxpark status` imports no image, backend or guest code,
and `boxpark guest serve` (which runs in the guest) no host code. So this module must never import a
group's module, nor anything else of the package, at its top (`errors` loads when an error is shown: it
imports typing, which `--help` does not need). A `BoxparkError` (or a transport
failure) becomes one sentence and a hint on stderr and its exit code; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys

from .. import __version__

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: a command pays for every module
if TYPE_CHECKING:
    from typing import Any, Callable, NoReturn

    from ..errors import BoxparkError, UsageError

__all__ = ["EPILOG", "UsageError", "build_parser", "die", "main"]

EPILOG = """addresses: unix:PATH, tcp:HOST:PORT (needs --secret-file), vsock:CID:PORT"""

# Every command, in the order `--help` lists them: its group's module (in boxpark.cli) and its one line.
COMMANDS: dict[str, tuple[str, str]] = {
    "guest": ("guest", "the Guest API: serve it, or make calls to it (debugging)"),
    "image": ("image", "build the guest image"),
    "vz": ("vz", "macOS: Virtualization.framework set-up"),
    "boot": ("boot", "boot a guest in the foreground (development)"),
    "up": ("machine", "bring a machine up: image, boot, docker; prints DOCKER_HOST"),
    "down": ("machine", "stop a machine gracefully"),
    "status": ("machine", "show a machine's state, boot timeline and docker status"),
    "exec": ("machine", "run a command in the guest"),
    "shell": ("machine", "an interactive shell in the guest"),
    "logs": ("machine", "show a machine's logs"),
    "agent": ("agent", "the machine agent (started by up; for debugging)"),
    "config": ("config", "show the default boxpark.toml"),
    "diagnose": ("diagnose", "write one archive for a bug report (logs, status, versions; secrets masked)"),
}


class Formatter(argparse.HelpFormatter):
    """argparse's help layout, with the terminal's width read without importing shutil (which loads the
    compression modules): what `shutil.get_terminal_size` does, $COLUMNS first."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: int | None = None) -> None:
        if width is None:
            try:
                width = int(os.environ["COLUMNS"])
            except (KeyError, ValueError):
                width = 0
            if width <= 0:
                try:
                    width = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
                except (AttributeError, ValueError, OSError):
                    width = 0
            width = (width or 80) - 2
        super().__init__(prog, indent_increment, max_help_position, width)


class LazyParser(argparse.ArgumentParser):
    """A command's parser that gets its options from its group's module the first time it is used."""

    loader: Callable[[argparse.ArgumentParser], None] | None = None

    def _load(self) -> None:
        loader, self.loader = self.loader, None
        if loader is not None:
            loader(self)

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        self._load()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self._load()
        return super().format_help()

    def format_usage(self) -> str:
        self._load()
        return super().format_usage()


class _Parsers(dict):  # type: ignore[type-arg]  # str -> LazyParser | None, as argparse's own map is untyped
    """The command name -> parser map of `_Commands`: a command's parser is made when first looked up."""

    def __init__(self, make: Callable[[str], argparse.ArgumentParser]) -> None:
        super().__init__()
        self._make = make

    def __getitem__(self, name: str) -> argparse.ArgumentParser:
        parser = super().__getitem__(name)
        if parser is None:
            parser = self[name] = self._make(name)
        return parser  # type: ignore[no-any-return]


class _Commands(argparse._SubParsersAction):  # type: ignore[type-arg]
    """The subcommands, each parser made only when its command is parsed (a parser costs a few gettext lookups
    and a dozen registrations: thirteen of them cost `boxpark status` more than its own work)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._kwargs: dict[str, dict[str, Any]] = {}
        self.choices = self._name_parser_map = _Parsers(self._make)

    def add_lazy(self, name: str, help: str, **kwargs: Any) -> None:
        """`add_parser`'s listing and its parser's arguments, without making the parser yet."""
        self._choices_actions.append(self._ChoicesPseudoAction(name, (), help))
        self._kwargs[name] = kwargs
        self._name_parser_map[name] = None

    def _make(self, name: str) -> argparse.ArgumentParser:
        kwargs = self._kwargs.pop(name)
        loader = kwargs.pop("loader")
        parser = self._parser_class(prog=f"{self._prog_prefix} {name}", **kwargs)
        parser.loader = loader
        return parser  # type: ignore[no-any-return]


def _loader(name: str, module: str) -> Callable[[argparse.ArgumentParser], None]:
    def load(parser: argparse.ArgumentParser) -> None:
        # __import__ rather than importlib.import_module: the import statement's path, which -X importtime reports
        __import__(f"{__name__}.{module}", fromlist=["add_arguments"]).add_arguments(name, parser)

    return load


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="boxpark", description="Run Docker in a minimal Linux guest VM.",
                                     epilog=EPILOG, formatter_class=Formatter)
    parser.add_argument("--version", action="version", version=f"boxpark {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=LazyParser,
                                     action=_Commands)
    assert isinstance(commands, _Commands)
    for name, (module, help_) in COMMANDS.items():
        commands.add_lazy(name, help_, formatter_class=Formatter, loader=_loader(name, module))
    return parser


def die(message: str, hint: str = "", code: int = 1) -> NoReturn:
    print(f"boxpark: {message}", file=sys.stderr)
    if hint:
        print(f"hint: {hint}", file=sys.stderr)
    raise SystemExit(code)


def __getattr__(name: str) -> Any:
    if name == "UsageError":  # re-exported, loaded when asked for
        from ..errors import UsageError

        return UsageError
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def user_error(exc: BaseException) -> BoxparkError | None:
    """The sentence for an error the person can act on; None for a bug (which keeps its traceback).

    The transport's errors are not BoxparkErrors (the guest image carries the transport, not this
    package's errors), so they are put into words here; they can only be raised if it was imported.
    """
    from ..errors import BoxparkError

    if isinstance(exc, BoxparkError):
        return exc
    transport = sys.modules.get("boxpark.transport")
    if transport is None:
        return None
    if isinstance(exc, transport.TransportError):
        return BoxparkError(str(exc))
    if isinstance(exc, transport.RemoteError):
        return BoxparkError(f"the guest refused the call ({exc.code.name}): {exc.message}")
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "logging", True) or args.debug:  # status, exec, shell, logs log nothing: no logging module
        import logging  # after parsing: `--help` and a bad command line need no logging

        logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                            format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # whoever read our output went away (`boxpark status | head -1`): as a shell's command
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that exit's flush cannot fail again
        return 128 + 13
    except Exception as exc:
        error = user_error(exc)
        if error is None or args.debug:
            raise
        die(error.message, error.hint, error.code)
