"""The shape of anomap's code, measured: what issue 35's review counted.

Counts import cycles among anomap's modules (top-level and in-function imports
alike), imports inside functions, the longest functions, functions with more
than eight parameters, reads of the run config by string key, and the places
that compare a score with a threshold. Writes one JSON, so a refactor's before
and after sit side by side.

    python benchmarks/code_shape.py --out benchmarks/results/diagnostics/code_shape.json
    git worktree add /tmp/before 7b19154 && python benchmarks/code_shape.py \
        --src /tmp/before/src --out benchmarks/results/diagnostics/code_shape_before.json

A count of source text, not a timing: the machine is recorded all the same.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
from pathlib import Path

from anomap.machine import describe_machine

ROOT = Path(__file__).resolve().parent.parent / "src"  # --src changes it
CONFIG_READ = re.compile(r"""\bconfig(?:\.get\(|\[)\s*["']""")
THRESHOLD_TEST = re.compile(r">=\s*(?:self\.|detector\.)?threshold\b")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def resolve(module: str, node: ast.ImportFrom, package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--src", type=Path, help="the source tree to count (default: this one)")
    args = parser.parse_args()
    global ROOT
    ROOT = (args.src or ROOT).resolve()
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    inner_imports, long_functions, many_parameters = [], [], []
    config_reads: dict[str, int] = {}
    threshold_tests = []
    for name, path in modules.items():
        text = path.read_text()
        tree = ast.parse(text)
        package = path.name == "__init__.py"
        functions = [n for n in ast.walk(tree)
                     if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
        nested = {id(inner) for f in functions for inner in ast.walk(f)
                  if isinstance(inner, ast.Import | ast.ImportFrom)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                targets = ([resolve(name, node, package)] if isinstance(node, ast.ImportFrom)
                           else [alias.name for alias in node.names])
                if isinstance(node, ast.ImportFrom):
                    base = targets[0]
                    targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                               for a in node.names]
                for target in targets:
                    if target.startswith("anomap") and target in modules and target != name:
                        graph[name].add(target)
                        if id(node) in nested:
                            inner_imports.append(f"{name} -> {target}")
        for f in functions:
            length = (f.end_lineno or f.lineno) - f.lineno + 1
            long_functions.append((length, f"{name}.{f.name}"))
            arguments = f.args
            count = len(arguments.posonlyargs + arguments.args + arguments.kwonlyargs)
            count -= bool(arguments.args and arguments.args[0].arg in ("self", "cls"))
            if count > 8:
                many_parameters.append((count, f"{name}.{f.name}"))
        reads = len(CONFIG_READ.findall(text))
        if reads:
            config_reads[name] = reads
        threshold_tests += [f"{name}:{i + 1}" for i, line in enumerate(text.splitlines())
                            if THRESHOLD_TEST.search(line)]
    cycles = strongly_connected(graph)
    result = {
        "modules": len(modules),
        "import_cycles": [sorted(c) for c in cycles],
        "modules_in_cycles": sum(len(c) for c in cycles),
        "imports_inside_functions": sorted(set(inner_imports)),
        "longest_functions": [f"{n} {length}" for length, n in sorted(long_functions)[::-1][:8]],
        "functions_over_8_parameters": [f"{n} {c}" for c, n in sorted(many_parameters)[::-1]],
        "config_string_key_reads": sum(config_reads.values()),
        "config_string_key_reads_by_module": config_reads,
        "score_threshold_comparisons": threshold_tests,
        "machine": describe_machine(),
    }
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)


def strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's components with more than one module: each is an import cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.add(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(component)

    for node in graph:
        if node not in index:
            visit(node)
    return found


if __name__ == "__main__":
    main()
