"""mgc.grammar: the lark grammar of .merge recipes and the parse tree → AST transformer."""
from .parse import parse, parse_file

__all__ = ["parse", "parse_file"]
