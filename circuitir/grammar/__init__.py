"""The .cir text language: the Circuit IR written down, and read back exactly.

    parse(text, filename) -> Circuit     checked; bad text raises CirSyntaxError (file:line:col)
    emit(circuit) -> str                 canonical text
    format_text(text, filename) -> str   emit(parse(text)), keeping the comments

``parse(emit(c)) == c`` for every valid circuit, and ``emit(parse(t)) == t``
for canonical text: floats are float32 written as the shortest decimal that
reads back to the same bits. The grammar is ``circuit.lark``; the language
reference is docs/cir-language.md.
"""

from circuitir.grammar.emitter import emit
from circuitir.grammar.parser import CirSyntaxError, parse, parse_with_comments


def format_text(text: str, filename: str = "<string>") -> str:
    """The canonical form of .cir text, its comments kept next to their statements.

    The text must be a well-formed circuit, not necessarily one complete enough to run (a missing
    final norm, say): formatting is a text job."""
    circuit, comments = parse_with_comments(text, filename, runnable=False)
    return emit(circuit, comments)


__all__ = ["CirSyntaxError", "emit", "format_text", "parse"]
