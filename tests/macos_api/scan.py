"""What the macOS modules ask of Apple's API, read from their source (AST): classes, selectors, constants,
libdispatch functions, the callables they hand over as blocks, and their delegate methods.

A small type inference follows values from the framework modules (`VZ.X.alloc().initWith…_()`, the
declared return types of selectors, `self.attr = …`, tuple results of `…error:` selectors) so each selector
is looked up on its receiver's class. Parameters the code types as `Any` get their class from
`PARAMETER_CLASSES`. A selector-style call (`name_(…)`) on a receiver of unknown class is reported, not
guessed. The API itself comes from an `Api` (the full metadata in `extract`, the committed table in the test).
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("boxpark/host/backends/vz.py", "boxpark/host/backends/vzplan.py", "boxpark/host/gcdbridge.py",
           "boxpark/host/wake.py")
FRAMEWORKS = {"Virtualization": "Virtualization", "Foundation": "Foundation", "AppKit": "AppKit",
              "dispatch": "libdispatch"}
# Parameters the code types as Any whose ObjC class its callers fix (VZ's and Foundation's answers).
PARAMETER_CLASSES = {"error": "NSError", "connection": "VZVirtioSocketConnection", "center": "NSNotificationCenter",
                     "balloon": "VZVirtioTraditionalMemoryBalloonDevice"}
RUNTIME_SELECTORS = {"alloc": True, "init": False}  # NSObject's (the runtime's headers, in no framework scan):
#   a class that declares one itself (e.g. to give it an availability) is checked against its own


class Api(Protocol):
    def kind(self, name: str) -> str | None: ...  # "class", "constant", "function" or None
    def method(self, cls: str, selector: str, class_method: bool) -> tuple[str, dict[str, Any]] | None: ...
    def function(self, name: str) -> dict[str, Any] | None: ...
    def protocol_method(self, selector: str) -> tuple[str, dict[str, Any]] | None: ...


@dataclass
class Use:
    kind: str  # class, constant, function, method, block, delegate, problem
    name: str  # "VZVirtualMachine", "VZVirtualMachine -setDelegate:", "dispatch_async", …
    where: str
    problems: list[str] = field(default_factory=list)


# Types: ("module", fw) ("class", name) ("object", name) ("array", name) ("bound", entry, receiver_class)
T = tuple[Any, ...] | None


def selector_of(attr: str) -> str:
    return attr.replace("_", ":")


def returned_class(retval: dict[str, Any], receiver: str) -> T:
    name = (retval.get("type_name") or "").strip()
    if retval.get("instancetype") or name == "instancetype":
        return ("object", receiver)
    if m := re.fullmatch(r"NSArray<(\w+) \*> \*", name):
        return ("array", m.group(1))
    if m := re.fullmatch(r"(?:const )?(\w+) \*(?: _\w+)?", name):
        return ("object", m.group(1))
    return None


class Scanner:
    def __init__(self, api: Api) -> None:
        self.api = api
        self.uses: list[Use] = []
        self.python_returns: dict[str, set[str]] = {}  # def name -> its return annotations, over all files

    # ----------------------------------------------------------------------- entry

    def scan(self, paths: tuple[str, ...] = SCANNED, sources: dict[str, str] | None = None) -> list[Use]:
        """The uses in `paths` (relative to the checkout), or in `sources` (name -> text) when given."""
        sources = sources or {p: (ROOT / p).read_text() for p in paths}
        trees = {p: ast.parse(text, p) for p, text in sources.items()}
        for tree in trees.values():
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    self.python_returns.setdefault(node.name, set()).add(
                        ast.unparse(node.returns) if node.returns else "")
        for path, tree in trees.items():
            self.path = Path(path).name
            self.module_env: dict[str, T] = {}
            self.defs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
            self._body(tree.body, self.module_env, None)
        return self.uses

    def _use(self, kind: str, name: str, node: ast.AST, problems: list[str] | None = None) -> None:
        self.uses.append(Use(kind, name, f"{self.path}:{getattr(node, 'lineno', 0)}", problems or []))

    # ----------------------------------------------------------------------- statements

    def _body(self, body: list[ast.stmt], env: dict[str, T], cls: ast.ClassDef | None) -> None:
        for stmt in body:
            self._imports(stmt, env)
            if isinstance(stmt, ast.ClassDef):
                self._class(stmt, env)
            elif isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
                self._function(stmt, env, cls)
            else:
                self._statement(stmt, env, cls)

    def _imports(self, stmt: ast.stmt, env: dict[str, T]) -> None:
        for node in ast.walk(stmt):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in FRAMEWORKS:
                        env[alias.asname or alias.name] = ("module", alias.name)
            elif isinstance(node, ast.ImportFrom) and node.module in FRAMEWORKS:
                for alias in node.names:
                    env[alias.asname or alias.name] = self._framework_name(alias.name, node)

    def _class(self, node: ast.ClassDef, env: dict[str, T]) -> None:
        objc_class = any(self._type(base, env) == ("class", "NSObject") for base in node.bases)
        attrs: dict[str, T] = {}
        self.class_attrs = attrs
        self.class_defs = {n.name: n for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
        for _ in range(2):  # self.attr types, then everything with them known
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    fenv = self._params(item, env)
                    self._imports(item, fenv)
                    for stmt in ast.walk(item):
                        if (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1
                                and isinstance(t := stmt.targets[0], ast.Attribute)
                                and isinstance(t.value, ast.Name) and t.value.id == "self"):
                            if isinstance(stmt.value, ast.Lambda):  # a callable kept on self, handed over later
                                self.class_defs.setdefault(t.attr, stmt.value)  # type: ignore[arg-type]
                            kind = self._quiet_type(stmt.value, fenv)
                            if kind is not None:
                                attrs[t.attr] = kind
        if objc_class:
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    self._delegate_method(item)
        self._body(node.body, env, node)
        self.class_attrs = {}
        self.class_defs = {}

    def _params(self, fn: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda, env: dict[str, T]) -> dict[str, T]:
        local = dict(env)
        for arg in fn.args.args:
            if arg.arg in PARAMETER_CLASSES:
                local[arg.arg] = ("object", PARAMETER_CLASSES[arg.arg])
        return local

    def _function(self, fn: ast.FunctionDef | ast.AsyncFunctionDef, env: dict[str, T],
                  cls: ast.ClassDef | None) -> None:
        local = self._params(fn, env)
        saved = getattr(self, "local_defs", {})
        self.local_defs = {**saved, **{n.name: n for n in ast.walk(fn) if isinstance(n, ast.FunctionDef) and n is not fn}}
        self._imports(fn, local)
        for stmt in fn.body:
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
                self._function(stmt, local, cls)
            elif isinstance(stmt, ast.ClassDef):
                self._class(stmt, local)
            else:
                self._statement(stmt, local, cls)
        self.local_defs = saved

    def _statement(self, stmt: ast.stmt, env: dict[str, T], cls: ast.ClassDef | None) -> None:
        for node in ast.walk(stmt):  # every expression once, in source order, with the env as it stands
            if isinstance(node, ast.Assign):
                self._assign(node, env)
        for node in ast.walk(stmt):
            if isinstance(node, ast.Call):
                self._type(node, env)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                base = self._quiet_type(node.value, env)
                if base is not None and base[0] == "module":
                    self._type(node, env)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "hasattr":
                if (len(node.args) == 2 and isinstance(node.args[1], ast.Constant)
                        and self._quiet_type(node.args[0], env) is not None
                        and self._quiet_type(node.args[0], env)[0] == "module"):  # type: ignore[index]
                    self._framework_name(node.args[1].value, node)

    def _assign(self, node: ast.Assign, env: dict[str, T]) -> None:
        target = node.targets[0]
        value = self._quiet_type(node.value, env)
        if isinstance(target, ast.Name):
            env[target.id] = value
        elif isinstance(target, ast.Tuple) and len(target.elts) == 2 and value and value[0] == "pair":
            for elt, kind in zip(target.elts, value[1:]):
                if isinstance(elt, ast.Name):
                    env[elt.id] = kind

    # ----------------------------------------------------------------------- expressions

    def _quiet_type(self, node: ast.expr, env: dict[str, T]) -> T:
        """The type without recording uses (for the first passes)."""
        uses = len(self.uses)
        kind = self._type(node, env)
        del self.uses[uses:]
        return kind

    def _framework_name(self, name: str, node: ast.AST) -> T:
        kind = self.api.kind(name)
        if kind == "class":
            self._use("class", name, node)
            return ("class", name)
        if kind == "constant":
            self._use("constant", name, node)
            return None
        if kind == "function":
            return ("function", name)
        self._use("problem", name, node, [f"{name}: no such class, constant or function in the table"])
        return None

    def _type(self, node: ast.expr, env: dict[str, T]) -> T:
        if isinstance(node, ast.Name):
            return env.get(node.id, self.module_env.get(node.id))
        if isinstance(node, ast.Attribute):
            if isinstance(node.value, ast.Name) and node.value.id == "self":
                return getattr(self, "class_attrs", {}).get(node.attr)
            base = self._type(node.value, env)
            if base is None:
                return None
            if base[0] == "module":
                return self._framework_name(node.attr, node)
            if base[0] in ("class", "object"):
                return self._method(base, node.attr, node)
            return None
        if isinstance(node, ast.Subscript):
            base = self._type(node.value, env)
            return ("object", base[1]) if base and base[0] == "array" else None
        if isinstance(node, ast.Call):
            return self._call(node, env)
        return None

    def _method(self, receiver: tuple[Any, ...], attr: str, node: ast.AST) -> T:
        class_method = receiver[0] == "class"
        found = self.api.method(receiver[1], selector_of(attr), class_method)
        if found is None and RUNTIME_SELECTORS.get(attr) == class_method:
            return ("bound", {"retval": {"instancetype": True}}, receiver[1])
        if found is None:
            self._use("problem", f"{receiver[1]} {'+' if class_method else '-'}{selector_of(attr)}", node,
                      [f"{receiver[1]} has no {'class ' if class_method else ''}selector {selector_of(attr)!r}"])
            return None
        owner, entry = found
        self._use("method", f"{owner} {'+' if class_method else '-'}{selector_of(attr)}", node)
        return ("bound", entry, receiver[1])

    def _call(self, node: ast.Call, env: dict[str, T]) -> T:
        func = self._type(node.func, env)
        if func is None:
            if (isinstance(node.func, ast.Attribute) and node.func.attr.endswith("_")
                    and not node.func.attr.startswith("_")):
                self._use("problem", selector_of(node.func.attr), node,
                          [f"{selector_of(node.func.attr)!r} called on a receiver of unknown class "
                           f"({ast.unparse(node.func.value)}): add its class to PARAMETER_CLASSES"])
            for arg in node.args:
                self._type(arg, env)
            return None
        for arg in node.args:
            self._type(arg, env)
        if func[0] == "function":
            entry = self.api.function(func[1])
            self._use("function", func[1], node)
            if entry:
                self._blocks(entry, node, func[1])
            return None
        if func[0] == "bound":
            entry, receiver = func[1], func[2]
            self._blocks(entry, node, f"{receiver} {node.func.attr if isinstance(node.func, ast.Attribute) else ''}")
            kind = returned_class(entry.get("retval", {}), receiver)
            if entry.get("error_out"):
                return ("pair", kind, ("object", "NSError"))
            return kind
        return None

    # ----------------------------------------------------------------------- blocks and delegates

    def _blocks(self, entry: dict[str, Any], call: ast.Call, what: str) -> None:
        for index, block in (entry.get("blocks") or {}).items():
            index = int(index)
            if index >= len(call.args):
                continue
            arg = call.args[index]
            fn = self._callable(arg)
            name = f"{what} block {index} ({ast.unparse(arg)})"
            if fn is None:
                if not (isinstance(arg, ast.Constant) and arg.value is None):
                    self._use("block", name, call, [f"{name}: cannot find the callable to check it"])
                continue
            method = not isinstance(fn, ast.Lambda) and isinstance(arg, ast.Attribute)  # bound: self is not passed
            self._use("block", name, call, self._check_returns(fn, block["retval"], len(block["args"]), name, method))

    def _callable(self, node: ast.expr) -> ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda | None:
        if isinstance(node, ast.Lambda):
            return node
        if isinstance(node, ast.Name):
            return getattr(self, "local_defs", {}).get(node.id) or self.defs.get(node.id)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
            return getattr(self, "class_defs", {}).get(node.attr)
        return None

    def _delegate_method(self, fn: ast.FunctionDef) -> None:
        signature = None
        for deco in fn.decorator_list:
            if (isinstance(deco, ast.Call) and ast.unparse(deco.func).endswith("typedSelector") and deco.args
                    and isinstance(deco.args[0], ast.Constant)):
                signature = deco.args[0].value.decode()
        selector = selector_of(fn.name)
        found = self.api.protocol_method(selector)
        if found is None:
            self._use("problem", selector, fn, [f"{selector}: no delegate protocol in the table has it"])
            return
        protocol, entry = found
        problems = []
        if signature != entry["signature"]:
            problems.append(f"{selector}: typedSelector {signature!r}, but {protocol} declares {entry['signature']!r}")
        problems += self._check_returns(fn, entry["signature"][0], entry["args"], f"{protocol} {selector}",
                                        method=True)
        self._use("delegate", f"{protocol} {selector}", fn, problems)

    def _check_returns(self, fn: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda, retval: str, nargs: int,
                       name: str, method: bool = False) -> list[str]:
        problems = []
        params = len(fn.args.args) - (1 if method else 0)
        if not fn.args.vararg and params != nargs:
            problems.append(f"{name}: the callable takes {params} arguments, the block passes {nargs}")
        values: list[ast.expr | None]
        if isinstance(fn, ast.Lambda):
            values = [fn.body]
        else:
            values = [n.value for n in _own_returns(fn)]
            if not fn.body or not isinstance(fn.body[-1], (ast.Return, ast.Raise)):
                values.append(None)  # falls off the end
        for value in values:
            none = value is None or self._is_none(value)
            if retval == "v" and not none:
                problems.append(f"{name}: the block returns void but the callable returns "
                                f"{ast.unparse(value) if value is not None else 'a value'} (PyObjC raises: "
                                f"'did not return None, expecting void return value')")
            elif retval != "v" and value is None:
                problems.append(f"{name}: the block returns {retval!r} but the callable can return None")
        return problems

    def _is_none(self, value: ast.expr) -> bool:
        if isinstance(value, ast.Constant):
            return value.value is None
        if isinstance(value, ast.Call):
            kind = self._quiet_type(value.func, dict(self.module_env))
            if kind is None and isinstance(value.func, ast.Attribute):
                receiver = value.func.value
                if isinstance(receiver, ast.Name) and receiver.id in PARAMETER_CLASSES:
                    kind = self._quiet_type(value.func, {receiver.id: ("object", PARAMETER_CLASSES[receiver.id])})
            if kind is not None and kind[0] == "bound":
                return kind[1].get("retval", {}).get("typestr") == "v"
            name = value.func.attr if isinstance(value.func, ast.Attribute) else getattr(value.func, "id", "")
            return self.python_returns.get(name) == {"None"}
        return False


def _own_returns(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> list[ast.Return]:
    """`fn`'s return statements, not those of functions nested in it."""
    found: list[ast.Return] = []
    stack: list[ast.AST] = list(fn.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            continue
        if isinstance(node, ast.Return):
            found.append(node)
        stack.extend(ast.iter_child_nodes(node))
    return found


class TableApi:
    """The committed table (tests/unit/data/macos_api.json) as an `Api`."""

    def __init__(self, table: dict[str, Any]) -> None:
        self.table = table

    def kind(self, name: str) -> str | None:
        for kind, key in (("class", "classes"), ("constant", "constants"), ("function", "functions")):
            if name in self.table[key]:
                return kind
        return None

    def method(self, cls: str, selector: str, class_method: bool) -> tuple[str, dict[str, Any]] | None:
        key = ("+" if class_method else "-") + selector
        for owner in self._lineage(cls):
            entry = self.table["methods"].get(owner, {}).get(key)
            if entry is not None:
                return owner, entry
        return None

    def _lineage(self, cls: str) -> list[str]:
        """`cls`, its superclasses, then its subclasses (an NSArray's elements are typed by their base class)."""
        classes = self.table["classes"]
        up, name = [], cls
        while name in classes and name not in up:
            up.append(name)
            name = classes[name].get("super")
        down = [c for c in classes if cls in self._supers(c)]
        return up + down

    def _supers(self, cls: str) -> list[str]:
        classes, found, name = self.table["classes"], [], self.table["classes"].get(cls, {}).get("super")
        while name and name not in found:
            found.append(name)
            name = classes.get(name, {}).get("super")
        return found

    def function(self, name: str) -> dict[str, Any] | None:
        return self.table["functions"].get(name)

    def protocol_method(self, selector: str) -> tuple[str, dict[str, Any]] | None:
        for protocol, methods in self.table["protocols"].items():
            if selector in methods:
                return protocol, methods[selector]
        return None
