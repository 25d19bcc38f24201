#!/usr/bin/env python3
"""Fails when files of a crate import each other in a cycle.

Each file under `src/` is a module (`a.rs` and `a/mod.rs` are `a`, `a/b.rs` is `a::b`). A file
depends on another when it names a path into it: `crate::a::b::Item`, `crate::{a, b::c}`, or
`super::x` from a nested file. Test modules at the end of a file (`#[cfg(test)] mod tests`) are
left out: a test may use what it tests. Run from the repository root:
`python3 ci/module_cycles.py flux kernels datasets rendezvous launcher trainer`.
"""
import os
import re
import sys


def module_files(src):
    """Module path (tuple) -> file."""
    mods = {}
    for root, _, names in os.walk(src):
        for n in names:
            if not n.endswith(".rs"):
                continue
            rel = os.path.relpath(os.path.join(root, n), src)[:-3].split(os.sep)
            if rel[-1] == "mod":
                rel = rel[:-1]
            if rel in (["lib"], ["main"]):
                continue
            mods[tuple(rel)] = os.path.join(root, n)
    return mods


def resolve(path, mods):
    """The longest module prefix of `path` that is a file."""
    for k in range(len(path), 0, -1):
        if tuple(path[:k]) in mods:
            return tuple(path[:k])
    return None


def brace_paths(prefix, body):
    """Expands `a, b::{c, d}, e::f` (the inside of `prefix::{...}`) into full paths."""
    out, depth, cur = [], 0, ""
    for ch in body + ",":
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        if ch == "," and depth == 0:
            item = cur.strip()
            cur = ""
            if not item:
                continue
            m = re.match(r"([a-zA-Z_0-9:]*?)::\{(.*)\}$", item, re.S)
            if m:
                out += brace_paths(prefix + m.group(1).split("::"), m.group(2))
            else:
                out.append(prefix + item.split(" as ")[0].strip().split("::"))
            continue
        cur += ch
    return out


def deps(modpath, text, mods):
    text = re.split(r"#\[cfg\(test\)\]\s*mod tests", text)[0]
    text = re.sub(r"//[^\n]*", "", text)
    paths = []
    for m in re.finditer(r"\bcrate::\{", text):
        start, depth, i = m.end(), 1, m.end()
        while depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        paths += brace_paths([], text[start : i - 1])
    paths += [p.split("::") for p in re.findall(r"\bcrate::([a-z_0-9]+(?:::[a-z_0-9]+)*)", text)]
    parent = list(modpath[:-1])
    paths += [parent + p.split("::") for p in re.findall(r"\bsuper::([a-z_0-9]+(?:::[a-z_0-9]+)*)", text)]
    for m in re.finditer(r"\bsuper::\{", text):
        start, depth, i = m.end(), 1, m.end()
        while depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        paths += brace_paths(parent, text[start : i - 1])
    out = set()
    for p in paths:
        target = resolve([s for s in p if s], mods)
        if target and target != modpath:
            out.add(target)
    return out


def cycle(graph):
    state, stack = {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def main(crates):
    bad = False
    for crate in crates:
        mods = module_files(os.path.join(crate, "src"))
        graph = {m: deps(m, open(f, encoding="utf-8").read(), mods) for m, f in mods.items()}
        found = cycle(graph)
        if found:
            print(f"{crate}: import cycle {' -> '.join('::'.join(m) for m in found)}")
            bad = True
        else:
            print(f"{crate}: no import cycle between its {len(mods)} files")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
