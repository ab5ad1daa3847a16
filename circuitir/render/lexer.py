"""A Pygments lexer for .cir, so that ``pygmentize -l cir`` and LaTeX's ``minted`` colour circuits.

Registered under the ``pygments.lexers`` entry point (alias ``cir``) in
pyproject.toml. It follows circuit.lark's tokens: keywords, nodes
(``0.attn.q[48]``), attributes (``bias=``), settings (``key =``), numbers,
strings, ``f32"..."`` tables, ``<-`` edges and comments.
"""

from __future__ import annotations

from pygments.lexer import RegexLexer, bygroups, words
from pygments.token import Comment, Keyword, Name, Number, Operator, Punctuation, String, Whitespace

NUMBER = r"[+-]?(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|inf|nan)"


class CirLexer(RegexLexer):
    name = "circuitir"
    aliases = ["cir", "circuitir"]
    filenames = ["*.cir"]
    mimetypes = ["text/x-circuitir"]
    url = "https://github.com/circuitir/circuitir"

    tokens = {
        "root": [
            # a setting at the start of its line: `metrics.loss = 0.12`, `metrics."per task".x = 1`
            (r'^([ \t]*)((?:[A-Za-z0-9_-]+|"(?:[^"\\\n]|\\.)*")(?:\.(?:[A-Za-z0-9_-]+|"(?:[^"\\\n]|\\.)*"))*)'
             r'([ \t]*)(=)', bygroups(Whitespace, Name.Property, Whitespace, Operator)),
            (r"[ \t]+", Whitespace),
            (r"\r?\n", Whitespace),
            (r"#.*?$", Comment.Single),
            (r'f32"', String.Other, "f32"),
            (r'"(?:[^"\\\n]|\\.)*"', String.Double),
            (r"(norm)([ \t]+)([A-Za-z0-9_.]+)", bygroups(Keyword, Whitespace, Name.Variable)),
            (words(("circuitir", "header", "config", "candidates", "embed", "layer", "final", "norm", "head",
                    "const", "bigram", "label"), suffix=r"\b"), Keyword),
            (words(("attn", "mlp", "rms", "layernorm", "auto", "passive_sq", "passive_sum"), suffix=r"\b"),
             Keyword.Type),
            (words(("true", "false", "null"), suffix=r"\b"), Keyword.Constant),
            (r"<-", Operator),
            (r"([A-Za-z0-9_][A-Za-z0-9_.]*)(\[)([0-9]+)(\])", bygroups(Name.Variable, Punctuation, Number.Integer,
                                                                     Punctuation)),
            (r"([a-z_]+)([ \t]*)(=)(?=[ \t]*[-+.0-9in])", bygroups(Name.Attribute, Whitespace, Operator)),
            (r"[0-9]+(?=[ \t]*:)", Number.Integer),
            (r"[0-9]+(?![0-9.eE])", Number.Integer),
            (NUMBER, Number.Float),
            (r"[{}\[\],:=]", Punctuation),
        ],
        "f32": [
            (r"[A-Za-z0-9+/=\s]+", String.Other),
            (r'"', String.Other, "#pop"),
        ],
    }


__all__ = ["CirLexer"]
