"""Writing the AST of one statement back as text, for `mgc fmt` (mgc/grammar/format.py): the flat form of
every node, line breaking at WIDTH columns (one indented line, or one item a line with a hanging indent and
a trailing comma; a last table argument hugging its call), the alignment of a table's values and of the `=`
and `to` of a run of statements, and where a comment inside a statement goes."""
from __future__ import annotations

from typing import Optional

from mgc.grammar import ast
from mgc.grammar.format_nodes import bracket_items, brackets, call_items, item_end, kids
from mgc.grammar.format_scan import Comment

WIDTH = 100
INDENT = "    "


class Printer:
    def __init__(self, recipe: ast.Recipe, magic: set):
        self.lines = recipe.source.text.split("\n")
        self.magic = magic
        self._forced: dict[int, bool] = {}
        self.leading: dict[int, list] = {}  # id(item in a bracket) -> comments on the lines before it
        self.trailing: dict[int, str] = {}  # id(item in a bracket) -> the comment after it on its last line
        self.dangling: dict[int, list] = {}  # id(bracket, or save for its options) -> comments after its items
        self.commented: set = set()  # id(bracket, or save for its options) holding comments: written open

    def attach(self, stmt, c: Comment) -> bool:
        """Attach a comment inside a statement to the innermost bracket around it (to the item it trails,
        or to the item after it); False if no bracket holds it."""
        pos = (c.line, c.col)
        best = None
        for owner, items, start, end in brackets(stmt):
            if start < pos < end and (best is None or start > best[2]):
                best = (owner, items, start, end)
        if best is None:
            return False
        owner, items, _, _ = best
        self.commented.add(id(owner))
        ends = [item_end(i) for i in items]
        before = [k for k, e in enumerate(ends) if e[0] == c.line and e <= pos]
        if before and id(items[before[-1]]) not in self.trailing:
            self.trailing[id(items[before[-1]])] = c.text
            return True
        after = next((i for i in items if (i.span.line, i.span.col) > pos), None)
        if after is not None:
            self.leading.setdefault(id(after), []).append(c.text)
        else:
            self.dangling.setdefault(id(owner), []).append(c.text)
        return True

    # -- source text of tokens ------------------------------------------------------------------
    def text(self, span) -> str:
        return self.lines[span.line - 1][span.col - 1:span.end_col - 1] if span.line == span.end_line else "?"

    def own_magic(self, node) -> bool:
        if isinstance(node, (ast.Call, ast.List, ast.Table)):
            return (node.span.end_line, node.span.end_col - 1) in self.magic or id(node) in self.commented
        return False

    def forced(self, node) -> bool:
        """Whether a node, or one inside it, must be written over several lines."""
        key = id(node)
        if key not in self._forced:
            self._forced[key] = self.own_magic(node) or any(self.forced(k) for k in kids(node))
        return self._forced[key]

    # -- flat forms ----------------------------------------------------------------------------
    def flat(self, x) -> str:
        if isinstance(x, ast.Number):
            return self.text(x.span)
        if isinstance(x, ast.String):
            return self.text(x.span)
        if isinstance(x, ast.Name):
            return x.id
        if isinstance(x, ast.List):
            return "[" + ", ".join(self.flat(i) for i in x.items) + "]"
        if isinstance(x, ast.Table):
            if not x.entries:
                return "{}"
            return "{ " + ", ".join(self.flat(e) for e in x.entries) + " }"
        if isinstance(x, ast.Entry):
            return self.key(x.key) + ": " + self.flat(x.value)
        if isinstance(x, (ast.Kwarg, ast.Option)):
            return x.name + " = " + self.flat(x.value)
        if isinstance(x, ast.Call):
            return x.func + "(" + ", ".join(self.flat(a) for a in call_items(x)) + ")"
        if isinstance(x, ast.LayerSlice):
            return self.flat_value_paren(x.value) + _slice(x.start, x.stop, ".layers")
        if isinstance(x, ast.With):
            return self.flat(x.value) + " with " + self.flat(x.table)
        raise TypeError(f"cannot format {type(x).__name__}")

    def flat_value_paren(self, v) -> str:
        return "(" + self.flat(v) + ")" if isinstance(v, ast.With) else self.flat(v)

    def key(self, k) -> str:
        if isinstance(k, ast.KeyName):
            return k.name
        if isinstance(k, ast.KeyString):
            return self.text(k.span)
        return _slice(k.start, k.stop, "layers")

    # -- layout --------------------------------------------------------------------------------
    def fmt(self, x, indent: int, col: int, tail: int) -> str:
        """x written from column `col` (0-based) in a block indented by `indent` columns, with `tail`
        characters following it on its last line."""
        if not self.forced(x):
            flat = self.flat(x)
            if col + len(flat) + tail <= WIDTH or _lone_atom(x):
                return flat
        if isinstance(x, (ast.Kwarg, ast.Option)):
            head = x.name + " = "
            return head + self.fmt(x.value, indent, col + len(head), tail)
        if isinstance(x, ast.Entry):
            head = self.key(x.key) + ": "
            return head + self.fmt(x.value, indent, col + len(head), tail)
        if isinstance(x, ast.With):
            value = self.fmt(x.value, indent, col, len(" with {"))
            return value + " with " + self.fmt(x.table, indent, _end_col(col, value) + len(" with "), tail)
        if isinstance(x, ast.LayerSlice):
            suffix = _slice(x.start, x.stop, ".layers")
            if isinstance(x.value, ast.With):
                return "(" + self.fmt(x.value, indent, col + 1, len(suffix) + 1 + tail) + ")" + suffix
            return self.fmt(x.value, indent, col, len(suffix) + tail) + suffix
        if isinstance(x, ast.Call):
            return self.bracket(x.func + "(", ")", call_items(x), indent, col, tail, self.own_magic(x), owner=x)
        if isinstance(x, ast.List):
            return self.bracket("[", "]", list(x.items), indent, col, tail, self.own_magic(x), owner=x)
        if isinstance(x, ast.Table):
            return self.bracket("{", "}", list(x.entries), indent, col, tail, True, align=True, owner=x)
        return self.flat(x)  # atoms never break

    def bracket(self, open_: str, close: str, items: list, indent: int, col: int, tail: int, magic: bool,
                align: bool = False, owner=None) -> str:
        inner = indent + len(INDENT)
        dangling = self.dangling.get(id(owner), [])
        if not items:
            return open_ + "".join("\n" + " " * inner + c for c in dangling) + ("\n" + " " * indent if dangling else "") + close
        if not magic:
            hugged = self.hug(open_, close, items, indent, col, tail)
            if hugged is not None:
                return hugged
            if not any(self.forced(i) for i in items) and not align:
                # all the items on one indented line of their own
                joined = ", ".join(self.flat(i) for i in items)
                if inner + len(joined) <= WIDTH:
                    return open_ + "\n" + " " * inner + joined + "\n" + " " * indent + close
        pad = 0
        if align and all(isinstance(e, ast.Entry) for e in items):
            pad = max(len(self.key(e.key)) for e in items) + 1
        out = [open_]
        for item in items:
            out.extend("\n" + " " * inner + c for c in self.leading.get(id(item), ()))
            if pad:
                head = (self.key(item.key) + ":").ljust(pad) + " "
                body = head + self.fmt(item.value, inner, inner + len(head), 1)
            else:
                body = self.fmt(item, inner, inner, 1)
            out.append("\n" + " " * inner + body + ",")
            if id(item) in self.trailing:
                out.append("  " + self.trailing[id(item)])
        out.extend("\n" + " " * inner + c for c in dangling)
        out.append("\n" + " " * indent + close)
        return "".join(out)

    def hug(self, open_: str, close: str, items: list, indent: int, col: int, tail: int) -> Optional[str]:
        """`f(a, b, t = {` + the last argument's table, one entry a line + `})`, where that fits."""
        *first, last = items
        value = last.value if isinstance(last, (ast.Kwarg, ast.Entry, ast.Option)) else last
        if not isinstance(value, (ast.Table, ast.List, ast.Call)) or not value.span or any(self.forced(i) for i in first):
            return None
        if not (isinstance(value, ast.Table) or self.own_magic(value)) or not bracket_items(value):
            return None
        head = open_ + "".join(self.flat(i) + ", " for i in first)
        if isinstance(last, (ast.Kwarg, ast.Option)):
            head += last.name + " = "
        elif isinstance(last, ast.Entry):
            head += self.key(last.key) + ": "
        opener = value.func + "(" if isinstance(value, ast.Call) else "[" if isinstance(value, ast.List) else "{"
        if col + len(head) + len(opener) > WIDTH:
            return None
        if isinstance(value, ast.Call):
            body = self.bracket(opener, ")", call_items(value), indent, col + len(head), len(close) + tail, True,
                                owner=value)
        elif isinstance(value, ast.List):
            body = self.bracket("[", "]", list(value.items), indent, col + len(head), len(close) + tail, True,
                                owner=value)
        else:
            body = self.bracket("{", "}", list(value.entries), indent, col + len(head), len(close) + tail, True,
                                align=True, owner=value)
        return head + body + close

    # -- statements ----------------------------------------------------------------------------
    def statement(self, s) -> str:
        if isinstance(s, ast.Assign):
            head = s.name + " = "
            return head + self.fmt(s.value, 0, len(head), 0)
        if isinstance(s, ast.Def):
            head = f"def {s.name}({', '.join(s.params)}) = "
            return head + self.fmt(s.body, 0, len(head), 0)
        # save: the value, then the options, break where they do not fit
        to = " to " + self.text(s.path_span)
        line = "save " + self.fmt(s.value, 0, len("save "), len(to) + (len(" {") if s.options else 0)) + to
        if not s.options:
            return line
        opts_flat = " { " + ", ".join(map(self.flat, s.options)) + " }"
        forced = ((s.span.end_line, s.span.end_col - 1) in self.magic or id(s) in self.commented
                  or any(self.forced(o) for o in s.options))
        if not forced and _end_col(0, line) + len(opts_flat) <= WIDTH:
            return line + opts_flat
        return line + " " + self.bracket("{", "}", list(s.options), 0, _end_col(0, line) + 1, 0, True, owner=s)

    def padded(self, s, text: str, pad: int, path_pad: int) -> str:
        """A single-line statement with its `=` (or `to`, and the `{` of its options) moved right: only
        spaces are added, so the line breaking is what it was without them (which keeps formatting stable)."""
        if isinstance(s, ast.Assign):
            return s.name.ljust(pad) + text[len(s.name):]
        value = self.flat(s.value)
        path = self.text(s.path_span)
        rest = text[len("save ") + len(value) + len(" to ") + len(path):]
        if rest and path_pad:
            path = path.ljust(path_pad)
        return "save " + value.ljust(pad) + " to " + path + rest


def _lone_atom(x) -> bool:
    """A call or list of one number, string or name: breaking it would not shorten it much."""
    items = call_items(x) if isinstance(x, ast.Call) else x.items if isinstance(x, ast.List) else ()
    return len(items) == 1 and isinstance(items[0], (ast.Number, ast.String, ast.Name))


def _slice(start, stop, prefix: str) -> str:
    return f"{prefix}[{'' if start is None else start}:{'' if stop is None else stop}]"


def _end_col(col: int, text: str) -> int:
    """The column after `text` written from column `col`."""
    return col + len(text) if "\n" not in text else len(text.rsplit("\n", 1)[1])

