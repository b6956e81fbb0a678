"""Extract the Apple API facts Boxpark's macOS modules need from PyObjC's metadata scans into a small table.

PyObjC (github.com/ronaldoussoren/pyobjc) records each framework's headers per macOS SDK as JSON:
`pyobjc-framework-<X>/metadata/raw*/arm64-<macOS>.fwinfo` (classes, selectors with argument and block types,
protocols, constants, functions, each with the header's `introduced` availability). The head holds only the
newest scan; the older ones are in the history. This reads every readable arm64 scan from a git mirror,
scans Boxpark's code (`scan.py`) for what it uses, and writes, for each class, selector, constant, function
and delegate method used: the header's `introduced`, the first scanned macOS that has it, and block and
delegate signatures. Run it again when the code uses a new name:

    python -m tests.macos_api.extract /path/to/pyobjc.git  [--out tests/unit/data/macos_api.json]

Reads git objects only; never imports PyObjC.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from .scan import ROOT, Scanner

SCAN_PATHS = {
    "Virtualization": "pyobjc-framework-Virtualization/metadata/raw",
    "Foundation": "pyobjc-framework-Cocoa/metadata/raw.Foundation",
    "AppKit": "pyobjc-framework-Cocoa/metadata/raw.AppKit",
    "libdispatch": "pyobjc-framework-libdispatch/metadata/raw",
}
OUT = ROOT / "tests/unit/data/macos_api.json"


def version_key(version: str | None) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split(".")) if version else ()


def git(repo: str, *args: str) -> str:
    return subprocess.run(["git", "--git-dir", repo, *args], check=True, capture_output=True, text=True).stdout


def scans(repo: str, framework: str) -> dict[str, tuple[str, dict[str, Any]]]:
    """macOS version -> (commit, definitions): the newest readable arm64 scan of each version in the history."""
    folder = SCAN_PATHS[framework]
    log = git(repo, "log", "--all", "--no-renames", "--format=commit %H", "--name-only", "--", f"{folder}/arm64-*.fwinfo")
    found: dict[str, tuple[str, dict[str, Any]]] = {}
    commit = ""
    for line in log.splitlines():
        if line.startswith("commit "):
            commit = line.split()[1]
        elif line.endswith(".fwinfo") and line.startswith(folder + "/arm64-"):
            version = line.rsplit("arm64-", 1)[1].removesuffix(".fwinfo")
            if version in found:
                continue
            done = subprocess.run(["git", "--git-dir", repo, "show", f"{commit}:{line}"], capture_output=True)
            if done.returncode != 0:  # deleted in this commit, or the blob is not in the mirror
                continue
            text = "\n".join(l for l in done.stdout.decode().splitlines() if not l.startswith("//"))
            found[version] = (commit, json.loads(text)["definitions"])
    return dict(sorted(found.items(), key=lambda kv: version_key(kv[0])))


def block_typedef(text: str) -> dict[str, Any] | None:
    """`void (^)(void)` (a typedef of a block type, e.g. dispatch_block_t) -> its return and argument types."""
    m = re.fullmatch(r"(.+?)\s*\(\^\)\((.*)\)", text.strip())
    if m is None:
        return None
    args = [a.strip() for a in m.group(2).split(",") if a.strip() and a.strip() != "void"]
    return {"retval": "v" if m.group(1).strip() == "void" else "@", "args": args}


def method_entry(method: dict[str, Any], typedefs: dict[str, str] | None = None) -> dict[str, Any]:
    retval = method.get("retval", {})
    entry: dict[str, Any] = {"introduced": method.get("introduced"),
                             "retval": {k: retval[k] for k in ("typestr", "type_name", "instancetype") if k in retval}}
    blocks = {}
    for index, arg in enumerate(method.get("args", [])):
        callable_ = arg.get("callable")
        if callable_:
            args = callable_.get("arguments", {})
            blocks[str(index)] = {"retval": callable_.get("retval", {}).get("type", "v"),
                                  "args": [args[k].get("type_name", args[k].get("type"))
                                           for k in sorted(args, key=int) if k != "0"]}
        elif arg.get("typestr") == "@?" and (typedef := block_typedef((typedefs or {}).get(arg.get("type_name"), ""))):
            blocks[str(index)] = typedef
    if blocks:
        entry["blocks"] = blocks
    args = method.get("args", [])
    if args and args[-1].get("typestr") == "^@" and args[-1].get("name") == "error":
        entry["error_out"] = True
    return entry


class MetadataApi:
    """The newest scans of all frameworks as an `Api` for the scanner."""

    def __init__(self, newest: dict[str, dict[str, Any]]) -> None:
        self.classes: dict[str, tuple[str, dict[str, Any]]] = {}
        self.constants: dict[str, tuple[str, dict[str, Any]]] = {}
        self.functions: dict[str, tuple[str, dict[str, Any]]] = {}
        self.protocols: dict[str, tuple[str, dict[str, Any]]] = {}
        self.typedefs: dict[str, str] = {}
        for framework, d in newest.items():
            self.typedefs.update(d.get("typedefs", {}))
            for name, cls in d.get("classes", {}).items():
                self.classes.setdefault(name, (framework, cls))
            for key in ("externs", "enum"):
                for name, value in d.get(key, {}).items():
                    self.constants.setdefault(name, (framework, value))
            for name, fn in d.get("functions", {}).items():
                self.functions.setdefault(name, (framework, fn))
            for name, proto in d.get("formal_protocols", {}).items():
                self.protocols.setdefault(name, (framework, proto))

    def kind(self, name: str) -> str | None:
        if name in self.classes:
            return "class"
        if name in self.constants:
            return "constant"
        if name in self.functions:
            return "function"
        return None

    def _raw_method(self, cls: str, selector: str, class_method: bool) -> dict[str, Any] | None:
        for method in self.classes[cls][1].get("methods", []):
            if method["selector"] == selector and bool(method.get("class_method")) == class_method:
                return method
        return None

    def lineage(self, cls: str) -> list[str]:
        up, name = [], cls
        while name in self.classes and name not in up:
            up.append(name)
            name = self.classes[name][1].get("super")
        down = [c for c in self.classes if cls in self.lineage_up(c)[1:]]
        return up + down

    def lineage_up(self, cls: str) -> list[str]:
        up, name = [], cls
        while name in self.classes and name not in up:
            up.append(name)
            name = self.classes[name][1].get("super")
        return up

    def method(self, cls: str, selector: str, class_method: bool) -> tuple[str, dict[str, Any]] | None:
        for owner in self.lineage(cls):
            raw = self._raw_method(owner, selector, class_method)
            if raw is not None:
                return owner, method_entry(raw, self.typedefs)
        return None

    def function(self, name: str) -> dict[str, Any] | None:
        return method_entry(self.functions[name][1], self.typedefs) if name in self.functions else None

    def protocol_method(self, selector: str) -> tuple[str, dict[str, Any]] | None:
        for name, (_, proto) in self.protocols.items():
            for method in proto.get("methods", []):
                if method["selector"] == selector:
                    signature = method["retval"]["typestr"] + "@:" + "".join(a["typestr"] for a in method["args"])
                    return name, {"introduced": method.get("introduced"), "signature": signature,
                                  "args": len(method["args"])}
        return None


def first_scan(history: dict[str, dict[str, Any]], present: Any) -> str | None:
    for version, definitions in history.items():
        if present(definitions):
            return version
    return None


def extract(repo: str) -> dict[str, Any]:
    all_scans = {fw: scans(repo, fw) for fw in SCAN_PATHS}
    newest = {fw: list(s.values())[-1][1] for fw, s in all_scans.items() if s}
    api = MetadataApi(newest)
    uses = Scanner(api).scan()
    history = {fw: {v: d for v, (_, d) in s.items()} for fw, s in all_scans.items()}
    table: dict[str, Any] = {
        "source": {"repository": "ronaldoussoren/pyobjc", "head": git(repo, "rev-parse", "HEAD").strip(),
                   "scans": {fw: {v: c for v, (c, _) in s.items()} for fw, s in all_scans.items()}},
        "classes": {}, "methods": {}, "constants": {}, "functions": {}, "protocols": {}}

    def add_class(name: str) -> None:
        for cls in api.lineage_up(name):
            framework, raw = api.classes[cls]
            table["classes"][cls] = {
                "framework": framework, "super": raw.get("super"),
                "first_scan": first_scan(history[framework], lambda d, c=cls: c in d.get("classes", {}))}

    for use in uses:
        if use.problems and use.kind == "problem":
            continue
        if use.kind == "class":
            add_class(use.name)
        elif use.kind == "method":
            owner, selector = use.name.split(" ")
            add_class(owner)
            framework = api.classes[owner][0]
            found = api.method(owner, selector[1:], selector[0] == "+")
            assert found is not None
            entry = dict(found[1])
            entry["first_scan"] = first_scan(history[framework], lambda d, o=owner, s=selector: any(
                m["selector"] == s[1:] and bool(m.get("class_method")) == (s[0] == "+")
                for m in d.get("classes", {}).get(o, {}).get("methods", [])))
            table["methods"].setdefault(owner, {})[selector] = entry
        elif use.kind == "constant":
            framework, raw = api.constants[use.name]
            table["constants"][use.name] = {
                "framework": framework, "introduced": raw.get("introduced") if isinstance(raw, dict) else None,
                "first_scan": first_scan(history[framework], lambda d, n=use.name: n in d.get("externs", {})
                                         or n in d.get("enum", {}))}
            if isinstance(raw, dict) and "value" in raw:
                table["constants"][use.name]["value"] = raw["value"]
        elif use.kind == "function":
            framework, raw = api.functions[use.name]
            entry = api.function(use.name)
            assert entry is not None
            entry["framework"] = framework
            entry["first_scan"] = first_scan(history[framework], lambda d, n=use.name: n in d.get("functions", {}))
            table["functions"][use.name] = entry
        elif use.kind == "delegate":
            protocol, selector = use.name.split(" ")
            found = api.protocol_method(selector)
            assert found is not None
            framework = api.protocols[protocol][0]
            entry = dict(found[1])
            entry["first_scan"] = first_scan(history[framework], lambda d, p=protocol, s=selector: any(
                m["selector"] == s for m in d.get("formal_protocols", {}).get(p, {}).get("methods", [])))
            table["protocols"].setdefault(protocol, {})[selector] = entry
    # the enum whose raw values vz.read_limits maps by hand
    for name, (framework, raw) in api.constants.items():
        if isinstance(raw, dict) and raw.get("enum") == "VZLinuxRosettaAvailability":
            table["constants"][name] = {"framework": framework, "value": raw["value"], "enum": raw["enum"],
                                        "first_scan": first_scan(history[framework],
                                                                 lambda d, n=name: n in d.get("enum", {}))}
    missing = sorted({p for use in uses for p in use.problems})
    return {"table": table, "missing": missing}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("repo", help="a git directory of github.com/ronaldoussoren/pyobjc (bare is fine)")
    parser.add_argument("--out", default=str(OUT), help="where to write the table")
    args = parser.parse_args(argv)
    result = extract(args.repo)
    Path(args.out).write_text(json.dumps(result["table"], indent=1, sort_keys=True) + "\n")
    for problem in result["missing"]:
        print(f"not in PyObjC's metadata (left out of the table): {problem}", file=sys.stderr)
    return 1 if result["missing"] else 0


if __name__ == "__main__":
    sys.exit(main())
