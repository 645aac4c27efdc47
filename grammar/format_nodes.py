"""The shape of the AST as `mgc fmt` walks it: the items of a bracket (a call's arguments, a list's items,
a table's entries), a node's children, and every bracket of a statement with where it starts and ends."""
from __future__ import annotations

from mgc.grammar import ast


def item_end(x) -> tuple:
    span = x.value.span if isinstance(x, (ast.Kwarg, ast.Option)) else x.span
    return (span.end_line, span.end_col)


def brackets(stmt):
    """(owner, items, start, end) of every bracket in a statement: calls, lists, tables and a save's options."""
    todo = [stmt.body] if isinstance(stmt, ast.Def) else [stmt.value]
    if isinstance(stmt, ast.Save) and stmt.options:
        sp = stmt.path_span
        yield stmt, list(stmt.options), (sp.end_line, sp.end_col), (stmt.span.end_line, stmt.span.end_col)
        todo += [o.value for o in stmt.options]
    while todo:
        x = todo.pop()
        if isinstance(x, (ast.Call, ast.List, ast.Table)):
            start = (x.func_span.end_line, x.func_span.end_col) if isinstance(x, ast.Call) else (x.span.line, x.span.col)
            yield x, bracket_items(x), start, (x.span.end_line, x.span.end_col)
        todo.extend(kids(x))


def call_items(call: ast.Call) -> list:
    return list(call.args) + list(call.kwargs)


def bracket_items(x) -> list:
    return call_items(x) if isinstance(x, ast.Call) else list(x.items) if isinstance(x, ast.List) else list(x.entries)


def kids(x) -> list:
    if isinstance(x, ast.Call):
        return call_items(x)
    if isinstance(x, ast.List):
        return list(x.items)
    if isinstance(x, ast.Table):
        return list(x.entries)
    if isinstance(x, (ast.Entry, ast.Kwarg, ast.Option, ast.LayerSlice)):
        return [x.value]
    if isinstance(x, ast.With):
        return [x.value, x.table]
    return []
