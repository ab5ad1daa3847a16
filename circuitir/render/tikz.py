"""TikZ figures of circuits, laid out by Graphviz.

``dot -Tjson`` places the bands, boxes and edge splines; this module writes
them as a ``tikzpicture`` with the same colours, widths and legend as the SVG,
so the paper's figure and the report's are the same drawing. The picture
needs ``\\usepackage{tikz}`` and ``\\usetikzlibrary{arrows.meta}``;
:func:`standalone` wraps it in a document that ``pdflatex`` turns into a PDF
of exactly the figure's size (with only texlive-latex-base and
texlive-pictures: no ``standalone`` class needed).
"""

from __future__ import annotations

import json
import re

from circuitir.render.graphviz import LEGEND, Drawing, edge_style, label_lines, legend_rows

TEX_SPECIALS = {"\\": r"\textbackslash{}", "{": r"\{", "}": r"\}", "$": r"\$", "&": r"\&", "#": r"\#",
                "^": r"\textasciicircum{}", "_": r"\_", "%": r"\%", "~": r"\textasciitilde{}",
                "<": r"\textless{}", ">": r"\textgreater{}", "|": r"\textbar{}", '"': r"\textquotedbl{}",
                "'": r"\textquotesingle{}", "`": r"\textasciigrave{}", "-": "-{}"}


def tex(text: str) -> str:
    """Text as LaTeX that prints it character for character (T1 encoding)."""
    return "".join(TEX_SPECIALS.get(c, c) if ord(c) < 128 else f"\\symbol{{{ord(c)}}}" for c in text)


def tikz_name(box_id: str) -> str:
    """A node name TikZ accepts: ``0.attn.q[48]`` -> ``0-attn-q-48``."""
    return re.sub(r"[^A-Za-z0-9]+", "-", box_id).strip("-")


def _colour_name(hex_colour: str) -> str:
    return "cir" + hex_colour.lstrip("#").lower()


def _point(text: str) -> tuple[float, float]:
    x, y = text.split(",")[:2]
    return float(x), float(y)


def _spline(pos: str) -> tuple[list[tuple[float, float]], tuple[float, float] | None]:
    end = None
    points = []
    for part in pos.split():
        if part.startswith("e,"):
            end = _point(part[2:])
        elif part.startswith("s,"):
            continue
        else:
            points.append(_point(part))
    return points, end


def to_tikz(drawing: Drawing, layout_json: bytes, collapsed: bool = False, font_size: float = 10.0) -> str:
    layout = json.loads(layout_json)
    boxes = {b.id: b for band in drawing.bands for b in band.boxes + [x for g in band.groups for x in g.boxes]}
    objects = layout.get("objects", [])
    colours = sorted({c for c in ("#ffffff", "#bbbbbb", "#444444", "#6a5acd")} |
                     {band.colour for band in drawing.bands} | {colour for _, colour, _ in LEGEND})
    largest = max((a.size or 0.0 for a in drawing.arrows if a.kind == "weight"), default=0.0)
    out = ["% circuitir figure: needs \\usepackage{tikz} and \\usetikzlibrary{arrows.meta}",
           "\\begin{tikzpicture}[x=1bp, y=1bp, every node/.style={font=\\sffamily}]"]
    for colour in colours + [edge_style(a, largest)["color"] for a in drawing.arrows]:
        line = f"\\definecolor{{{_colour_name(colour)}}}{{HTML}}{{{colour.lstrip('#').upper()}}}"
        if line not in out:
            out.append(line)
    size = f"\\fontsize{{{font_size:g}}}{{{font_size * 1.15:g}}}\\selectfont "
    small = f"\\fontsize{{{font_size - 2:g}}}{{{(font_size - 2) * 1.1:g}}}\\selectfont "
    if layout.get("label") and "lp" in layout:
        x, y = _point(layout["lp"])
        out.append(f"\\node[font=\\sffamily{size}] at ({x:.1f},{y:.1f}) {{{tex(layout['label'])}}};")
    band_labels = []
    for obj in objects:  # bands, then the heads inside them (graphviz lists outer clusters first)
        if not obj.get("name", "").startswith("cluster") or "bb" not in obj:
            continue
        x1, y1, x2, y2 = map(float, obj["bb"].split(","))
        fill = _colour_name(obj.get("fillcolor", "#ffffff"))
        edge = _colour_name(obj.get("color", "#bbbbbb"))
        out.append(f"\\filldraw[rounded corners=4bp, fill={fill}, draw={edge}, line width=0.6bp] "
                   f"({x1:.1f},{y1:.1f}) rectangle ({x2:.1f},{y2:.1f});")
        if obj.get("label") and "lp" in obj:  # drawn over the edges, on the band's colour, so they stay legible
            x, y = _point(obj["lp"])
            band_labels.append(f"\\node[font=\\sffamily{size}, fill={fill}, inner sep=1bp] at ({x:.1f},{y:.1f}) "
                               f"{{{tex(obj['label'])}}};")
    for arrow_obj in layout.get("edges", []):
        tail, head = objects[arrow_obj["tail"]]["name"], objects[arrow_obj["head"]]["name"]
        arrow = next((a for a in drawing.arrows if a.source == tail and a.target == head), None)
        if arrow is None or "pos" not in arrow_obj:
            continue
        style = edge_style(arrow, largest)
        points, end = _spline(arrow_obj["pos"])
        dash = {"dashed": ", dashed", "dotted": ", dotted"}.get(style["style"], "")
        path = f"({points[0][0]:.1f},{points[0][1]:.1f})"
        for i in range(1, len(points) - 2, 3):
            (a, b), (c, d), (e, f) = points[i:i + 3]
            path += f" .. controls ({a:.1f},{b:.1f}) and ({c:.1f},{d:.1f}) .. ({e:.1f},{f:.1f})"
        if end is not None:
            path += f" -- ({end[0]:.1f},{end[1]:.1f})"
        out.append(f"\\draw[{_colour_name(style['color'])}, line width={float(style['penwidth']):.2f}bp{dash}, "
                   f"-{{Stealth[length=4bp,width=3bp]}}] {path}; % {tex(tail)} -> {tex(head)}")
    out += band_labels
    for obj in objects:
        name = obj.get("name")
        if "pos" not in obj or name is None:
            continue
        x, y = _point(obj["pos"])
        width, height = float(obj["width"]) * 72, float(obj["height"]) * 72
        if name == "legend":
            out.append(_legend(x, y, width, collapsed, small))
            continue
        box = boxes.get(name)
        if box is None:
            continue
        text = f"{size}{tex(box.title)}"
        if box.label:
            lines = "\\\\".join(f"{small}\\color{{cir444444}}{tex(line)}" for line in label_lines(box.label))
            text += f"\\\\{lines}"
        shape = "double, double distance=1bp, " if box.shape == "doubleoctagon" else ""
        out.append(f"\\node[draw, {shape}rounded corners=3bp, fill=white, align=center, inner sep=1.5bp, "
                   f"minimum width={width:.1f}bp, minimum height={height:.1f}bp] ({tikz_name(name)}) "
                   f"at ({x:.1f},{y:.1f}) {{{text}}}; % {tex(name)}")
    out.append("\\end{tikzpicture}")
    return "\n".join(out) + "\n"


def _legend(x: float, y: float, width: float, collapsed: bool, small: str) -> str:
    rows = []
    for text, colour, style in legend_rows(collapsed):
        if colour is None:
            rows.append(tex(text))
            continue
        dash = {"dashed": ", dashed", "dotted": ", dotted"}.get(style, "")
        rows.append(f"\\tikz[baseline=-0.6ex]\\draw[{_colour_name(colour)}, line width=1bp{dash}] (0,0) -- (12bp,0);"
                    f" {tex(text)}")
    body = "\\\\".join(rows)
    return (f"\\node[align=left, anchor=west, inner sep=0pt, font=\\sffamily{small}] (legend) "
            f"at ({x - width / 2:.1f},{y:.1f}) {{{body}}};")


def standalone(picture: str) -> str:
    """A LaTeX document whose one page is exactly the picture (pdflatex; base + pictures packages only)."""
    return "\n".join([
        "\\documentclass{article}",
        "\\usepackage[T1]{fontenc}",
        "\\usepackage{lmodern}",
        "\\usepackage{tikz}",
        "\\usetikzlibrary{arrows.meta}",
        "\\begin{document}",
        "\\newsavebox\\cirfigure",
        "\\sbox\\cirfigure{%",
        picture.rstrip("\n") + "%",
        "}",
        "\\pdfpagewidth=\\wd\\cirfigure",
        "\\pdfpageheight=\\dimexpr\\ht\\cirfigure+\\dp\\cirfigure\\relax",
        "\\hoffset=-1in \\voffset=-1in",
        "\\shipout\\hbox{\\box\\cirfigure}",
        "\\end{document}",
    ]) + "\n"
