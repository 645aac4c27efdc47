"""mgc.compiler: the AST, the checker, lowering to the tensor graph, and the passes."""
