"""compile: a Circuit IR to a ``torch.fx.GraphModule`` that runs on token ids alone.

The module maps token ids (B, T) to the candidates' logits (B, T, K) using
only what the circuit holds. Each site is a small *live vector* (its kept
channels, computed, and its constants), each linear map a dense matrix of
kept rows by live columns, so a circuit of a few dozen nodes does a few
dozen multiply-adds per token where the model does millions.
"""

from __future__ import annotations

import torch
import torch.fx
from torch import nn

from circuitir.ir.circuit import Circuit, Node, site_specs
from circuitir.ir.topology import MATRICES
from circuitir.models.gpt import AbsTopK, topk_k

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}


def take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[..., index]`` for a long ``index`` of any shape, as one ``gather``: on CPU several times
    faster than advanced indexing on the last dimension, which dominated a circuit's run time.

    Written with sizes as values (``x.shape[:-1] + flat.shape``), not unpacked, so that torch.fx traces
    it as it is. It used to be a ``torch.fx.wrap``-ed leaf; every traced module then registered the
    wrap again in torch.fx's global table (its generated code calls ``wrap``), so each compile walked
    every earlier one's entry and kept its code alive: a process that compiled thousands of circuits
    (the fuzzer, a sweep) slowed down quadratically and grew without bound."""
    flat = index.reshape(-1)
    out = torch.gather(x, -1, flat.expand(x.shape[:-1] + flat.shape))
    return out.reshape(x.shape[:-1] + index.shape)


class LiveSite(nn.Module):
    """Assemble a site's live vector from its kept values and constants, then apply AbsTopK if any."""

    def __init__(self, n_kept: int, const_values: list[float], order: list[int], topk: int | None):
        super().__init__()
        self.register_buffer("const", torch.tensor(const_values, dtype=torch.float32))
        self.register_buffer("order", torch.tensor(order, dtype=torch.long))
        self.has_const = bool(const_values)
        self.has_kept = n_kept > 0
        self.topk = AbsTopK(topk) if topk else None

    def forward(self, kept: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``kept``: (B, T, n_kept) computed values; ``like``: any (B, T, ...) tensor, for the shape."""
        parts = []
        if self.has_kept:
            parts.append(kept)
        if self.has_const:
            parts.append(self.const + torch.zeros_like(like[..., :1]))
        if not parts:
            return like[..., :0]
        x = take(torch.cat(parts, dim=-1), self.order)
        if self.topk is not None:
            x = self.topk(x)
        return x


class CircuitModule(nn.Module):
    def __init__(self, circuit: Circuit):
        super().__init__()
        config = circuit.config
        self.n_layer = config["n_layer"]
        self.d_head = config["d_head"]
        self.scale = config["d_head"] ** -0.5
        self.norm_mode = circuit.norm_mode
        calibration = circuit.calibration
        self.logit_scale, self.logit_shift = calibration.scale, calibration.shift
        specs = {s.name: s for s in site_specs(config, len(circuit.candidates))}
        self.specs = specs

        self.live: dict[str, list[int]] = {}
        self.kept: dict[str, list[int]] = {}
        sites = nn.ModuleDict()
        for name, spec in specs.items():
            if spec.kind == "logits":
                continue
            kept = circuit.site_nodes(name, ("kept",))
            const = circuit.site_nodes(name, ("const",))
            live = sorted(kept + const)
            position = {c: i for i, c in enumerate(kept + const)}
            self.kept[name], self.live[name] = kept, live
            topk = topk_k(config["afrac"], spec.width) if spec.topk else None
            sites[_key(name)] = LiveSite(len(kept), [circuit.nodes[Node(name, c)].value for c in const],
                                         [position[c] for c in live], topk)
        self.sites = sites

        # Residual stream: tracked channels only.
        self.tracked = circuit.tracked_channels()
        tracked_pos = {c: i for i, c in enumerate(self.tracked)}
        vocab = config["vocab_size"]
        embed = torch.zeros(vocab, len(self.tracked))
        for c, column in circuit.embed.items():
            embed[:, tracked_pos[c]] = column
        self.register_buffer("embed", embed)
        self.d_model = config["d_model"]

        def positions(site, channels):
            return torch.tensor([tracked_pos[c] for c in channels], dtype=torch.long)

        def matrix(src, dst):
            src_pos = {c: i for i, c in enumerate(self.live[src])}
            dst_pos = {c: i for i, c in enumerate(self.kept[dst])}
            weight = torch.zeros(len(dst_pos), len(src_pos))
            bias = torch.tensor([circuit.nodes[Node(dst, c)].bias for c in self.kept[dst]], dtype=torch.float32)
            for (s, d), w in circuit.edges.items():
                if s.site == src and d.site == dst:
                    weight[dst_pos[d.index], src_pos[s.index]] = w
            return weight, bias

        self.layers = []
        for layer in range(self.n_layer):
            for sub in ("attn", "mlp"):
                prefix = f"{layer}.{sub}"
                read = f"{prefix}.act_in"
                norm = circuit.norms.get(prefix)
                entry = {"prefix": prefix, "has_read": bool(self.kept[read]) and norm is not None}
                self._buffer(f"{_key(prefix)}_read_pos", positions(read, self.kept[read]))
                self._buffer(f"{_key(prefix)}_gain", torch.tensor(
                    [circuit.nodes[Node(read, c)].gain for c in self.kept[read]], dtype=torch.float32))
                self._buffer(f"{_key(prefix)}_shift", torch.tensor(
                    [circuit.nodes[Node(read, c)].shift for c in self.kept[read]], dtype=torch.float32))
                if norm is not None:
                    entry.update(rms=norm.rms, eps=norm.eps, width=norm.width, frozen=norm.frozen_scale)
                    self._buffer(f"{_key(prefix)}_psq", norm.passive_sq if norm.passive_sq is not None
                                 else torch.zeros(vocab))
                    self._buffer(f"{_key(prefix)}_psum", norm.passive_sum if norm.passive_sum is not None
                                 else torch.zeros(vocab))
                write = f"{prefix}.resid_delta"
                self._buffer(f"{_key(prefix)}_write_pos", positions(write, self.live[write]))
                # The sublayer's matrices, from the topology table; those that reach their output
                # through attention heads are assembled with the heads below.
                for m in MATRICES:
                    if m.sublayer == sub and m.via != "heads":
                        w, b = matrix(f"{prefix}.{m.src}", f"{prefix}.{m.dst}")
                        self._buffer(f"{_key(prefix)}_w_{m.dst}", w)
                        self._buffer(f"{_key(prefix)}_b_{m.dst}", b)
                if sub == "attn":
                    heads = sorted(h for (L, h) in circuit.heads if L == layer)
                    entry["heads"] = heads
                    q_live = {c: i for i, c in enumerate(self.live[f"{prefix}.q"])}
                    k_live = {c: i for i, c in enumerate(self.live[f"{prefix}.k"])}
                    qk_index = lambda live_pos: torch.tensor(  # noqa: E731
                        [[live_pos[h * self.d_head + c] for c in range(self.d_head)] for h in heads],
                        dtype=torch.long).reshape(len(heads), self.d_head)
                    self._buffer(f"{_key(prefix)}_qidx", qk_index(q_live))
                    self._buffer(f"{_key(prefix)}_kidx", qk_index(k_live))
                    head_pos = {h: i for i, h in enumerate(heads)}
                    v_used = [c for c in self.live[f"{prefix}.v"] if c // self.d_head in head_pos]
                    v_live = {c: i for i, c in enumerate(self.live[f"{prefix}.v"])}
                    # Value channels per head, padded to the widest head with an index to a zero column,
                    # so one (T x T) @ (T x C) product per head serves all its channels.
                    per_head = [[c for c in v_used if c // self.d_head == h] for h in heads]
                    width_v = max([len(cs) for cs in per_head] + [1])
                    pad = len(self.live[f"{prefix}.v"])
                    self._buffer(f"{_key(prefix)}_vpad", torch.tensor(
                        [[v_live[c] for c in cs] + [pad] * (width_v - len(cs)) for cs in per_head],
                        dtype=torch.long).reshape(len(heads), width_v))
                    flat = {c: i * width_v + j for i, cs in enumerate(per_head) for j, c in enumerate(cs)}
                    self._buffer(f"{_key(prefix)}_zidx", torch.tensor([flat[c] for c in v_used], dtype=torch.long))
                    sinks = [circuit.heads[(layer, h)] for h in heads]
                    entry["sink"] = bool(sinks) and sinks[0] is not None
                    self._buffer(f"{_key(prefix)}_sink", torch.tensor(
                        [s if s is not None else 0.0 for s in sinks], dtype=torch.float32))
                    # Output weights (the table's through-heads matrix) read z of the used v channels.
                    (through,) = [m for m in MATRICES if m.sublayer == sub and m.via == "heads"]
                    w_o, b_o = matrix(f"{prefix}.{through.src}", f"{prefix}.{through.dst}")
                    used_cols = torch.tensor([v_live[c] for c in v_used], dtype=torch.long)
                    self._buffer(f"{_key(prefix)}_w_{through.dst}", w_o[:, used_cols] if len(v_used) else
                                 torch.zeros(len(self.kept[write]), 0))
                    self._buffer(f"{_key(prefix)}_b_{through.dst}", b_o)
                self.layers.append(entry)
        self.act = ACTIVATIONS[config["activation_type"]]()

        # Final norm and logits: final_resid is live on every channel.
        final = circuit.norms["final"]
        self.final_rms, self.final_eps, self.final_frozen = final.rms, final.eps, final.frozen_scale
        self._buffer("final_kept_pos", positions("final_resid", self.kept["final_resid"]))
        n_out = len(circuit.candidates)
        final_pos = {c: i for i, c in enumerate(self.live["final_resid"])}
        w_out = torch.zeros(n_out, len(final_pos))
        for (s, d), w in circuit.edges.items():
            if d.site == "logits":
                w_out[d.index, final_pos[s.index]] = w
        self._buffer("w_out", w_out)
        self._buffer("b_out", torch.tensor([circuit.nodes[Node("logits", k)].bias for k in range(n_out)],
                                           dtype=torch.float32))
        self.has_bigram = circuit.bigram is not None
        self._buffer("bigram", circuit.bigram if circuit.bigram is not None else torch.zeros(vocab, n_out))

    def _buffer(self, name, tensor):
        self.register_buffer(name, tensor.contiguous())

    def buf(self, prefix, suffix):
        return getattr(self, f"{_key(prefix)}_{suffix}")

    def site(self, name):
        return self.sites[_key(name)]

    def normalise(self, resid, tokens, entry):
        """Gain-less normalised values of the kept reads, exactly as the model's norm sees them."""
        prefix = entry["prefix"]
        width = entry["width"]
        sq = self.buf(prefix, "psq")[tokens] + resid.pow(2).sum(-1)
        if entry["rms"]:
            centred_mean = None
            scale = torch.rsqrt((sq / width).clamp_min(0) + entry["eps"])
        else:
            mean = (self.buf(prefix, "psum")[tokens] + resid.sum(-1)) / width
            centred_mean = mean
            # E[x^2] - E[x]^2 is a variance, never negative, but rounding (or a file's tables that no
            # model could have written) can make it so: clamped, the norm stays finite.
            scale = torch.rsqrt((sq / width - mean * mean).clamp_min(0) + entry["eps"])
        if entry["frozen"] is not None:
            scale = torch.full_like(sq, entry["frozen"])
        reads = take(resid, self.buf(prefix, "read_pos"))
        if centred_mean is not None:
            reads = reads - centred_mean.unsqueeze(-1)
        return reads * scale.unsqueeze(-1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        resid = self.embed[tokens]  # (B, T, tracked)
        zero = torch.zeros_like(tokens, dtype=torch.float32).unsqueeze(-1)  # (B, T, 1): shapes constants
        for entry in self.layers:
            prefix = entry["prefix"]
            if entry["has_read"]:
                kept_read = self.normalise(resid, tokens, entry) * self.buf(prefix, "gain") + self.buf(prefix, "shift")
            else:
                kept_read = resid[..., :0]
            x = self.site(f"{prefix}.act_in")(kept_read, zero)
            write_site = self.site(f"{prefix}.resid_delta")
            if prefix.endswith("attn") and not entry["heads"]:
                # No head computed: every write of this sublayer is its folded bias.
                delta = write_site(self.buf(prefix, "b_resid_delta") + zero, zero)
            elif prefix.endswith("attn"):
                q, k, v = (self.site(f"{prefix}.{part}")(x @ self.buf(prefix, f"w_{part}").T
                                                         + self.buf(prefix, f"b_{part}"), zero) for part in "qkv")
                qh = take(q, self.buf(prefix, "qidx")).transpose(1, 2) * self.scale  # (B, H, T, D)
                kh = take(k, self.buf(prefix, "kidx")).transpose(1, 2)
                scores = qh @ kh.transpose(-2, -1)  # scaled through q: a (T, D) product, not (T, T)
                causal = torch.ones_like(scores[0, 0], dtype=torch.bool).tril()  # (T, T)
                scores = scores.masked_fill(~causal, float("-inf"))
                if entry["sink"]:
                    sink = self.buf(prefix, "sink").view(1, -1, 1, 1).expand_as(scores[..., :1])
                    pattern = torch.softmax(torch.cat([sink, scores], dim=-1), dim=-1)[..., 1:]
                else:
                    pattern = torch.softmax(scores, dim=-1)
                v_padded = take(torch.cat([v, zero * 0], dim=-1), self.buf(prefix, "vpad"))  # (B, T, H, C)
                z = (pattern @ v_padded.transpose(1, 2)).transpose(1, 2).flatten(-2)  # (B, T, H*C)
                z = take(z, self.buf(prefix, "zidx"))  # (B, T, used v channels)
                delta = write_site(z @ self.buf(prefix, "w_resid_delta").T + self.buf(prefix, "b_resid_delta"), zero)
            else:
                hidden = self.act(x @ self.buf(prefix, "w_post_act").T + self.buf(prefix, "b_post_act"))
                post = self.site(f"{prefix}.post_act")(hidden, zero)
                delta = write_site(post @ self.buf(prefix, "w_resid_delta").T + self.buf(prefix, "b_resid_delta"), zero)
            resid = resid.index_add(-1, self.buf(prefix, "write_pos"), delta)
        # Live final_resid channels; any channel left out is one the final norm's statistics do not
        # depend on (frozen RMS scale), so sums divide by the full width.
        final = self.site("final_resid")(take(resid, self.final_kept_pos), zero)
        if self.final_rms:
            centred = final
            variance = final.pow(2).sum(-1, keepdim=True) / self.d_model
        else:
            centred = final - final.sum(-1, keepdim=True) / self.d_model
            variance = centred.pow(2).sum(-1, keepdim=True) / self.d_model
        scale = torch.rsqrt(variance + self.final_eps)
        if self.final_frozen is not None:
            scale = torch.full_like(variance, self.final_frozen)
        logits = (centred * scale) @ self.w_out.T + self.b_out
        if self.has_bigram:
            logits = logits + self.bigram[tokens]
        return logits * self.logit_scale + self.logit_shift


def _key(name: str) -> str:
    return name.replace(".", "_")


def compile_circuit(circuit: Circuit) -> torch.fx.GraphModule:
    """The circuit as a traced GraphModule: token ids (B, T) -> candidate logits (B, T, K)."""
    module = CircuitModule(circuit)
    module.eval()
    return torch.fx.symbolic_trace(module)
