"""The macOS layer against Apple's API as PyObjC records it, without a Mac.

tests/unit/data/macos_api.json holds what Boxpark uses of Virtualization, Foundation, AppKit and libdispatch,
extracted from PyObjC's per-release header scans (`python -m tests.macos_api.extract PYOBJC.git`, which
records the commits). The code of vz.py, vzplan.py, gcdbridge.py and wake.py is read as source
(`tests/macos_api/scan.py`): every class, selector (on its receiver's class), constant and function must be
in the table and no newer than the macOS the README promises; every callable handed to ObjC as a block or
defined as a delegate method must take the arguments the block passes and return what it returns (None for
void: PyObjC raises on the framework's thread otherwise).
"""

from __future__ import annotations

import ast
import json
import re
from typing import Any

import pytest

from tests.macos_api.scan import ROOT, Scanner, TableApi, Use

TABLE = ROOT / "tests/unit/data/macos_api.json"


def promised_macos() -> str:
    """The oldest macOS the README promises the vz backend (its requirements line)."""
    found = re.findall(r"macOS (\d+(?:\.\d+)?) or later", (ROOT / "README.md").read_text())
    assert len(set(found)) == 1, f"the README should name one minimum macOS, found {found}"
    return found[0]


def version(text: str) -> tuple[int, ...]:
    parts = [int(p) for p in text.split(".")]
    while len(parts) > 1 and parts[-1] == 0:  # 13 == 13.0
        parts.pop()
    return tuple(parts)


@pytest.fixture(scope="module")
def table() -> dict[str, Any]:
    return json.loads(TABLE.read_text())


@pytest.fixture(scope="module")
def uses(table: dict[str, Any]) -> list[Use]:
    return Scanner(TableApi(table)).scan()


def entry_of(table: dict[str, Any], use: Use) -> dict[str, Any]:
    if use.kind == "class":
        return table["classes"][use.name]
    if use.kind == "constant":
        return table["constants"][use.name]
    if use.kind == "function":
        return table["functions"][use.name]
    if use.kind == "method":
        owner, selector = use.name.split(" ")
        return table["methods"][owner][selector]
    protocol, selector = use.name.split(" ")
    return table["protocols"][protocol][selector]


def test_the_table_says_where_it_comes_from(table: dict[str, Any]) -> None:
    source = table["source"]
    assert source["repository"] == "ronaldoussoren/pyobjc" and re.fullmatch(r"[0-9a-f]{40}", source["head"])
    for framework in ("Virtualization", "Foundation", "AppKit", "libdispatch"):
        scans = source["scans"][framework]
        assert scans and all(re.fullmatch(r"[0-9a-f]{40}", commit) for commit in scans.values())


def test_every_name_the_code_uses_is_in_the_table(uses: list[Use]) -> None:
    names = [u for u in uses if u.kind == "problem"]
    assert not names, "\n".join(f"{u.where}: {p}" for u in names for p in u.problems)
    kinds = {u.kind for u in uses}
    assert {"class", "method", "constant", "function", "block", "delegate"} <= kinds  # the scan sees each kind


def test_nothing_is_newer_than_the_promised_macos(table: dict[str, Any], uses: list[Use]) -> None:
    promised = version(promised_macos())
    newer = []
    for use in uses:
        if use.kind in ("problem", "block"):
            continue
        entry = entry_of(table, use)
        minimum = entry.get("introduced") or entry.get("first_scan")
        if minimum and version(minimum) > promised:
            newer.append(f"{use.where}: {use.name} needs macOS {minimum}")
    assert not newer, f"the README promises macOS {promised_macos()}:\n" + "\n".join(newer)


def test_blocks_and_delegate_methods_return_what_objc_expects(uses: list[Use]) -> None:
    checked = [u for u in uses if u.kind in ("block", "delegate")]
    wrong = [f"{u.where}: {p}" for u in checked for p in u.problems]
    assert not wrong, "\n".join(wrong)
    names = {u.name.split(" (")[0] for u in checked}
    assert {"VZVirtioSocketListenerDelegate listener:shouldAcceptNewConnection:fromSocketDevice:",
            "VZVirtualMachineDelegate guestDidStopVirtualMachine:",
            "dispatch_async block 1"} <= names, names
    assert any("addObserverForName_object_queue_usingBlock_" in u.name for u in checked)


# wake.py's observer as it was (a lambda returning Inbox.deliver's bool to a void block), and other shapes
BAD_WAKE = '''
from typing import Any
import AppKit
import Foundation

class Watch:
    def __init__(self, center: Any, queue: Any) -> None:
        self._token = center.addObserverForName_object_queue_usingBlock_(
            AppKit.NSWorkspaceDidWakeNotification, None, queue, lambda notification: self._inbox.deliver(True))

    def deliver(self, item: bool) -> bool:
        return True
'''


def scan_source(table: dict[str, Any], text: str) -> list[Use]:
    return Scanner(TableApi(table)).scan(sources={"wake.py": text})


def test_a_void_block_that_returns_a_value_fails_the_check(table: dict[str, Any]) -> None:
    problems = [p for u in scan_source(table, BAD_WAKE) for p in u.problems]
    assert any("returns void but the callable returns self._inbox.deliver(True)" in p for p in problems), problems


@pytest.mark.parametrize("source, expected", [
    ("import Virtualization as VZ\nVZ.VZVirtualMachine.alloc().startWithCompletionHandlr_(None)\n",
     "VZVirtualMachine has no selector 'startWithCompletionHandlr:'"),
    ("import Virtualization as VZ\nVZ.VZNoSuchThing.alloc()\n", "VZNoSuchThing: no such class"),
    ("import Virtualization as VZ\nvm = VZ.VZVirtualMachine.alloc().init()\n"
     "vm.startWithCompletionHandler_(lambda error, extra: None)\n",
     "the callable takes 2 arguments, the block passes 1"),
    ("import Virtualization as VZ\ndef f(thing):\n    thing.setDelegate_(None)\n",
     "'setDelegate:' called on a receiver of unknown class"),
    ("import objc\nfrom Foundation import NSObject\nclass D(NSObject):\n"
     "    @objc.typedSelector(b'v@:@')\n    def guestDidStopVirtualMachine_(self, vm):\n        return True\n",
     "the block returns void but the callable returns True"),
])
def test_the_check_catches(table: dict[str, Any], source: str, expected: str) -> None:
    problems = [p for u in scan_source(table, source) for p in u.problems]
    assert any(expected in p for p in problems), problems


def test_newer_api_would_be_refused(table: dict[str, Any]) -> None:
    """The version check has teeth: a selector newer than the promise is seen as such."""
    newer = dict(table, methods={**table["methods"], "VZVirtualMachine": {
        **table["methods"]["VZVirtualMachine"], "-startWithCompletionHandler:": {
            **table["methods"]["VZVirtualMachine"]["-startWithCompletionHandler:"], "introduced": "99.0"}}})
    uses = Scanner(TableApi(newer)).scan()
    late = [u for u in uses if u.kind == "method" and u.name == "VZVirtualMachine -startWithCompletionHandler:"]
    assert late and version(entry_of(newer, late[0])["introduced"]) > version(promised_macos())


def test_read_limits_maps_rosetta_availability_as_vz_numbers_it(table: dict[str, Any]) -> None:
    source = (ROOT / "boxpark/host/backends/vz.py").read_text()
    fn = next(n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef) and n.name == "read_limits")
    mapping = next(ast.literal_eval(n.value) for n in ast.walk(fn)
                   if isinstance(n, ast.Assign) and ast.unparse(n.targets[0]) == "availability")
    values = {name.removeprefix("VZLinuxRosettaAvailability"): e["value"] for name, e in table["constants"].items()
              if e.get("enum") == "VZLinuxRosettaAvailability"}
    assert mapping == {values["NotSupported"]: "unsupported", values["NotInstalled"]: "not-installed",
                       values["Installed"]: "installed"}
