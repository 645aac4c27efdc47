"""The canonical layout of a recipe (`mgc fmt`): parse, then print the AST back with the comments kept.

Rules (deterministic, so formatting is idempotent: format(format(x)) == format(x)):

* one statement per line: `name = expr`, `def f(a, b) = expr`, `save expr to "dir" { name = value }`;
  `, ` between items, ` = ` in keyword arguments and options, `key: value` in tables, `{ a: 1 }` inside braces;
* numbers, strings and save paths are printed as the user spelled them (1e-5 stays 1e-5, escapes stay);
  redundant parentheses are dropped;
* blank lines between statements are kept, at most one in a row; none at the start, one newline at the end;
* a run of single-line assignments on consecutive lines has its `=` aligned; a run of single-line saves on
  consecutive lines has its `to` aligned (and the `{` of their options); a blank line, a comment line, a `def`
  or a multi-line statement ends a run; trailing comments on consecutive lines are aligned;
* a call, list or table that does not fit in WIDTH columns has its items on one indented line of their own
  or, where they do not fit there either, one item a line with a 4-space hanging indent and a trailing
  comma; a trailing comma in the source (`f(a, b,)`) or a comment inside keeps it one item a line; a call
  whose last argument is a table (or a bracket written one item a line) keeps the others on its first line:
  `slerp(a, b, t = {` ... `})`; a table written one entry a line aligns its values; a call or list of a
  single number, string or name is never broken;
* comments: a comment on its own line stays where it is, before the next statement; a comment after a
  statement on its last line stays after it; inside a call, list, table or a save's options, a comment
  stays after the item it follows on the same line, or before the item that follows it (after the last
  item if none does); any other comment inside a statement (in a def's parameters, a `.layers[...]`, between
  a value and `with` or `to`) moves to the line before the statement or after the bracket's last item.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from mgc.grammar import ast
from mgc.grammar.format_files import read_recipe, recipe_files, write_atomically
from mgc.grammar.format_layout import WIDTH, Printer
from mgc.grammar.format_scan import scan as _scan
from mgc.grammar.parse import parse

# WIDTH and _scan are imported from here by tests/test_fmt.py
__all__ = ["WIDTH", "fmt_files", "format_recipe", "format_text", "read_recipe", "recipe_files", "write_atomically"]


@dataclass
class _Item:
    start: int  # first source line
    end: int  # last source line
    stmt: Optional[object] = None
    comment: Optional[str] = None
    leading: list = field(default_factory=list)  # comments from inside the statement, moved before it
    trailing: Optional[str] = None


def format_recipe(recipe: ast.Recipe) -> str:
    """The canonical text of a parsed recipe (its source supplies the comments and the spelling of tokens)."""
    comments, magic = _scan(recipe.source.text)
    printer = Printer(recipe, magic)
    items = [_Item(s.span.line, s.span.end_line, stmt=s) for s in recipe.statements]
    for c in comments:
        # the last statement that ends on this line before the comment: a trailing comment
        owner = None
        for it in items:
            if it.stmt is not None and it.end == c.line and it.stmt.span.end_col <= c.col:
                owner = it
        if owner is not None and owner.trailing is None:
            owner.trailing = c.text
            continue
        inside = next((it for it in items if it.stmt is not None and it.start <= c.line <= it.end), None)
        if owner is None and inside is not None and printer.attach(inside.stmt, c):
            continue
        if owner is not None or inside is not None:
            (owner or inside).leading.append(c.text)
            continue
        items.append(_Item(c.line, c.line, comment=c.text))
    items.sort(key=lambda it: (it.start, 0 if it.comment is not None else 1))

    # render each statement on its own, unpadded, to know which are single-line
    rendered = [printer.statement(it.stmt) if it.stmt is not None else None for it in items]
    # runs of single-line assignments / saves on consecutive source lines, with no blank line between
    pads: dict[int, tuple[int, int]] = {}
    i = 0
    while i < len(items):
        kind = _kind(items[i], rendered[i])
        j = i + 1
        while (kind and j < len(items) and _kind(items[j], rendered[j]) == kind and not items[j].leading
               and items[j].start - items[j - 1].end <= 1):
            j += 1
        if kind == "assign":
            width = max(len(items[k].stmt.name) for k in range(i, j))
            for k in range(i, j):
                pads[k] = (width, 0)
        elif kind == "save":
            width = max(len(printer.flat(items[k].stmt.value)) for k in range(i, j))
            with_opts = [k for k in range(i, j) if items[k].stmt.options]
            path_width = max((len(printer.text(items[k].stmt.path_span)) for k in with_opts), default=0)
            for k in range(i, j):
                pads[k] = (width, path_width if len(with_opts) > 1 else 0)
        i = max(j, i + 1)

    out: list[str] = []  # lines
    trailing: list[tuple[int, str]] = []  # (index into out, comment)
    prev_end = None
    for k, it in enumerate(items):
        if prev_end is not None and it.start - prev_end >= 2:
            out.append("")
        if it.comment is not None:
            out.append(it.comment)
        else:
            out.extend(it.leading)
            text = rendered[k]
            if k in pads:
                pad, path_pad = pads[k]
                text = printer.padded(it.stmt, text, pad, path_pad)
                # alignment may push a line past WIDTH: line breaking is decided without it (stability)
            out.extend(text.split("\n"))
            if it.trailing is not None:
                trailing.append((len(out) - 1, it.trailing))
        prev_end = it.end
    # align trailing comments on consecutive lines
    g = 0
    while g < len(trailing):
        h = g + 1
        while h < len(trailing) and trailing[h][0] == trailing[h - 1][0] + 1:
            h += 1
        col = max(len(out[trailing[m][0]]) for m in range(g, h)) + 2
        for m in range(g, h):
            idx, text = trailing[m]
            out[idx] = out[idx].ljust(col) + text
        g = h
    while out and out[-1] == "":
        out.pop()
    return "\n".join(line.rstrip() for line in out) + "\n" if out else ""


def _kind(item: _Item, rendered: Optional[str]) -> Optional[str]:
    if item.stmt is None or "\n" in rendered:
        return None
    if isinstance(item.stmt, ast.Assign):
        return "assign"
    if isinstance(item.stmt, ast.Save):
        return "save"
    return None


def format_text(text: str, name: str = "<recipe>") -> str:
    """The canonical text of a recipe; raises RecipeSyntaxError (located) if it does not parse."""
    return format_recipe(parse(text, name))



def fmt_files(paths, check: bool, out, err, stdin=None) -> int:
    """`mgc fmt [--check] FILE...`: the exit status (0, or 1 if a file did not parse or, with check, would
    change). out/err take one line each; `-` reads stdin and writes the formatted text to out."""
    from mgc.core.errors import MgcError

    status = 0
    changed = 0
    files = recipe_files(paths)
    for path in files:
        try:
            if str(path) == "-":
                text = stdin.read()
                new = format_text(text, "<stdin>")
                if check:
                    if new != text:
                        err("would reformat -")
                        status, changed = 1, changed + 1
                else:
                    out(new, nl=False)
                continue
            text = read_recipe(path)
            new = format_text(text, str(path))
        except MgcError as e:
            err(e.render())
            status = 1
            continue
        if new == text:
            continue
        changed += 1
        if check:
            out(f"would reformat {path}")
            status = 1
        else:
            try:
                write_atomically(path, new)
            except OSError as e:
                err(f"error: cannot write {path}: {e.strerror or e}")
                status = 1
                continue
            out(f"reformatted {path}")
    if not any(str(p) == "-" for p in files) or check:
        n = len(files)
        verb = "would be reformatted" if check else "reformatted"
        err(f"{changed} of {n} recipe{'s' if n != 1 else ''} {verb}")
    return status
