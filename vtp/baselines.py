r"""Training-free pruning baselines, as ``keep_fn(batch, vlm) -> keep [B, N]`` for :func:`vtp.evaluate.accuracy`.

Each scores the :math:`N` visual tokens of every sample and keeps the top :math:`k = \max(1,
\operatorname{round}(\rho N))` (:func:`vtp.pruner.topk_keep_mask`); the kept tokens are then physically
removed as for the learned pruner.

* **random**: uniform scores (a fresh draw per batch from a seeded generator).
* **FastV-style** (Chen et al. 2024): the attention that the position predicting the answer (the last
  question token) pays to each image token in an early language-model layer, averaged over heads, in the
  unpruned model. FastV ranks by the attention of layer :math:`K-1` and drops tokens after layer
  :math:`K = 2`; here the scores of layer index 1 prune the input, the same removal the learned pruner gets.
* **object (pixel reference)**: the fraction of a patch's pixels whose colour differs from the image's
  background (its top-left pixel). easy-VQA images hold one shape on a plain background, so this is an
  oracle-like reference of "where the object is", not a method.

For scenes (:mod:`vtp.scenes`, 576 tokens) three more, no training either:

* **VisionZip-style** (Yang et al. 2024, arXiv 2412.04467; :class:`VisionZip`): dominant tokens by the vision
  tower's [CLS] attention, plus contextual tokens that merge the rest by key similarity.
* **evidence oracle** (:func:`evidence_oracle`): the patches a question's answer depends on, first; the upper
  bound of selection.
* :func:`evidence_recall`: the fraction of a question's evidence patches a keep mask contains.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention import policy_attention
from .pruner import check_ratio, topk_keep_mask

__all__ = ["random_scores", "fastv_scores", "object_scores", "keep_by_scores", "BASELINES", "cls_attention",
           "merge_tokens", "VisionZip", "evidence_oracle", "evidence_recall", "keep_masks"]


def random_scores(batch, vlm, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform random scores [B, N]."""
    B, N = batch["input_ids"].shape[0], _n_visual(vlm)
    return torch.rand(B, N, generator=generator).to(batch["input_ids"].device)


def _n_visual(vlm) -> int:
    from .vlm import num_visual_tokens
    return num_visual_tokens(vlm.llava)


class _Enough(Exception):
    """Raised by :func:`fastv_scores`'s hook once it holds the layer it needs."""


@torch.no_grad()
def fastv_scores(batch, vlm, layer: int = 1) -> torch.Tensor:
    """Head-averaged attention [B, N] from the answer-predicting position to each image token at ``layer``.

    The answer-predicting position is the one before the first supervised label, or, when ``batch["labels"]``
    is missing or ``None``, the last attended position (the prompt's end). ``batch["visual_tokens"]`` [B, N, d],
    if given, replaces the projected features of ``batch["pixel_values"]`` (a caller that computed them). Only
    layers ``0..layer`` run, and only ``layer``'s weights are kept (not every layer's, as ``output_attentions``
    would: at 576 tokens those are gigabytes per batch)."""
    lm = vlm.language_model
    n_layers = lm.config.num_hidden_layers
    if not (0 <= layer < n_layers):
        raise ValueError(f"layer must be in [0, {n_layers - 1}], got {layer}")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    tokens = batch.get("visual_tokens")
    if tokens is None:
        tokens = vlm.visual_features(batch["pixel_values"])
    visual = ids == vlm.image_token_id
    embeds = vlm.llava.get_input_embeddings()(ids)
    embeds = embeds.masked_scatter(visual.unsqueeze(-1), tokens.to(embeds.dtype))
    caught = {}

    def catch(module, args, output):  # keep this layer's weights [B, H, L, L], skip the layers after it
        caught["weights"] = output[1]
        raise _Enough

    hook = lm.layers[layer].self_attn.register_forward_hook(catch)
    try:
        with policy_attention(lm):  # returns attention weights (SDPA does not)
            lm(inputs_embeds=embeds, attention_mask=mask, use_cache=False)
    except _Enough:
        pass
    finally:
        hook.remove()
    att = caught["weights"].float().mean(1)  # [B, L, L]
    labels = batch.get("labels")
    if labels is not None:
        query = (labels[:, 1:] != -100).int().argmax(-1)  # position that predicts the answer
    else:
        query = mask.long().cumsum(-1).argmax(-1)  # the last attended position
    rows = att[torch.arange(ids.shape[0], device=ids.device), query]  # [B, L]
    return rows[visual].view(ids.shape[0], -1)


def object_scores(batch, vlm, tol: float = 0.05) -> torch.Tensor:
    """Fraction [B, N] of each patch's pixels that differ from the background colour (top-left pixel)."""
    px = batch["pixel_values"].float()
    diff = (px - px[:, :, :1, :1]).abs().amax(1, keepdim=True) > tol  # [B, 1, H, W]
    n = _n_visual(vlm)
    side = int(round(n ** 0.5))
    if side * side != n:
        raise ValueError(f"object scores need a square grid of visual tokens, got {n}")
    return F.adaptive_avg_pool2d(diff.float(), side).flatten(1)


def keep_by_scores(score_fn, ratio: float, **kwargs):
    """A ``keep_fn`` for :func:`vtp.evaluate.accuracy`: top-k of ``score_fn(batch, vlm, **kwargs)``."""
    ratio = check_ratio(ratio)

    def keep_fn(batch, vlm):
        return topk_keep_mask(score_fn(batch, vlm, **kwargs), ratio)

    return keep_fn


BASELINES = {"random": random_scores, "fastv": fastv_scores, "object": object_scores}


# ---- scenes peers: VisionZip-style selection, evidence oracle, evidence recall ------------------------------

def _feature_layer(vlm, layer: int | None):
    """The vision-tower layer whose attention VisionZip reads: by default the one that outputs LLaVA's features
    (``hidden_states[l]`` is the output of layer ``l - 1``; negative ``l`` index layers directly)."""
    cfg = vlm.llava.config
    if getattr(cfg.vision_config, "model_type", "") != "clip_vision_model":
        raise ValueError("VisionZip-style scoring needs a vision tower with a [CLS] token (CLIP), got "
                         f"{getattr(cfg.vision_config, 'model_type', '?')!r}")
    tower = vlm.llava.model.vision_tower
    layers = getattr(tower, "vision_model", tower).encoder.layers  # transformers versions differ in nesting
    if layer is None:
        f = cfg.vision_feature_layer
        layer = f if f < 0 else f - 1
    if not (-len(layers) <= layer < len(layers)):
        raise ValueError(f"layer must be in [{-len(layers)}, {len(layers) - 1}], got {layer}")
    return layers[layer].self_attn


@torch.no_grad()
def cls_attention(vlm, pixel_values: torch.Tensor, layer: int | None = None):
    r"""The [CLS] token's attention to each patch in a vision-tower ``layer``, averaged over heads, and the
    patches' keys there: ``(attention [B, N], keys [B, N, d])``.

    .. math::  a_j = \frac1H \sum_h \operatorname{softmax}_j\Big(\frac{q_{h,\text{cls}} \cdot k_{h,j}}{\sqrt{d_h}}\Big)

    over all :math:`N + 1` positions ([CLS] included), then restricted to the :math:`N` patches. Read from the
    layer's query and key projections (forward hooks), so it works with any attention implementation.
    """
    attn = _feature_layer(vlm, layer)
    got = {}
    hooks = [attn.q_proj.register_forward_hook(lambda m, i, o: got.__setitem__("q", o)),
             attn.k_proj.register_forward_hook(lambda m, i, o: got.__setitem__("k", o))]
    try:
        vlm.llava.model.vision_tower(pixel_values=pixel_values)
    finally:
        for h in hooks:
            h.remove()
    q, k = got["q"].float(), got["k"].float()  # [B, N + 1, d]
    B, T, d = k.shape
    H = attn.num_heads
    kh = k.view(B, T, H, d // H).transpose(1, 2)  # [B, H, T, d_h]
    qc = q[:, :1].view(B, 1, H, d // H).transpose(1, 2)  # [B, H, 1, d_h]
    a = torch.softmax((qc @ kh.transpose(-1, -2)).squeeze(2) * attn.scale, dim=-1).mean(1)  # [B, T]
    return a[:, 1:], k[:, 1:]


def merge_tokens(x: torch.Tensor, assign: torch.Tensor) -> torch.Tensor:
    r"""Token :math:`j` becomes the mean of the tokens assigned to it, :math:`x'_j = \frac{1}{|A_j|}\sum_{i \in A_j}
    x_i` with :math:`A_j = \{i : \text{assign}_i = j\}`; tokens nobody is assigned to are returned unchanged.
    ``x`` [B, N, d], ``assign`` [B, N] (long, in [0, N))."""
    if assign.shape != x.shape[:2]:
        raise ValueError(f"assign must have shape {tuple(x.shape[:2])}, got {tuple(assign.shape)}")
    sums = torch.zeros_like(x, dtype=torch.float32).scatter_add_(1, assign.unsqueeze(-1).expand_as(x), x.float())
    ones = torch.ones(assign.shape, device=x.device)
    counts = torch.zeros(assign.shape, device=x.device).scatter_add_(1, assign, ones)
    c = counts.unsqueeze(-1)
    return torch.where(c > 0, sums / c.clamp(min=1), x.float()).to(x.dtype)


class VisionZip:
    r"""VisionZip-style selection as a ``keep_fn`` (from the paper's description; question-blind, no training).

    With budget :math:`k = \max(1, \operatorname{round}(\rho N))`:

    1. **dominant tokens**: the :math:`k_d = \operatorname{round}(f k)` patches with the largest [CLS] attention
       :math:`a_j` (:func:`cls_attention`; :math:`f` = ``dominant_fraction``, the paper's 54 of 64);
    2. **contextual tokens**: :math:`k_c = k - k_d` targets spaced uniformly over the remaining patches (in index
       order); every other remaining patch joins the target whose key is most similar (cosine), and with
       ``merge`` each target's vision feature becomes the mean of its group (:func:`merge_tokens`, applied to
       the projector's input of the model's next forward pass through a one-shot hook).
    """

    def __init__(self, ratio: float, dominant_fraction: float = 54 / 64, layer: int | None = None, merge: bool = True):
        self.ratio = check_ratio(ratio)
        if not (0.0 < dominant_fraction <= 1.0):
            raise ValueError(f"dominant_fraction must be in (0, 1], got {dominant_fraction}")
        self.dominant_fraction, self.layer, self.merge, self._hook = dominant_fraction, layer, merge, None

    def select(self, pixel_values: torch.Tensor, vlm):
        """``(keep [B, N], assign [B, N])`` per image: ``assign[j]`` is the token that ``j`` merges into."""
        att, keys = cls_attention(vlm, pixel_values, self.layer)
        B, N = att.shape
        k = max(1, round(self.ratio * N))
        kd = min(k, max(1, round(self.dominant_fraction * k)))
        keep = torch.zeros(B, N, device=att.device).scatter_(1, att.topk(kd, dim=-1).indices, 1.0)
        assign = torch.arange(N, device=att.device).expand(B, N).clone()
        if k > kd:
            rest = keep.argsort(dim=-1, stable=True)[:, : N - kd]  # dropped so far, in index order
            targets = rest[:, (torch.arange(k - kd, device=att.device) * (N - kd)) // (k - kd)]  # [B, k_c]
            keep.scatter_(1, targets, 1.0)
            kn = F.normalize(keys, dim=-1)
            pick = lambda idx: kn.gather(1, idx.unsqueeze(-1).expand(-1, -1, kn.shape[-1]))  # noqa: E731
            nearest = targets.gather(1, (pick(rest) @ pick(targets).transpose(1, 2)).argmax(-1))
            assign.scatter_(1, rest, nearest)
            assign.scatter_(1, targets, targets)  # a target keeps itself
        return keep, assign

    def __call__(self, batch, vlm) -> torch.Tensor:
        keep, assign = self.select(batch["pixel_values"], vlm)
        if self.merge:
            self._merge_next_forward(vlm, assign)
        index = batch.get("image_index")
        return keep if index is None else keep[index]

    def discard(self) -> None:
        """Drop a merge still waiting for a forward pass (after calling this only for its keep mask)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _merge_next_forward(self, vlm, assign):
        self.discard()

        def hook(module, args):
            self.discard()
            return (merge_tokens(args[0], assign),) + tuple(args[1:])

        self._hook = vlm.llava.model.multi_modal_projector.register_forward_pre_hook(hook)


def evidence_oracle(evidence: torch.Tensor, ratio: float):
    r"""A ``keep_fn`` that keeps a question's evidence patches first (``evidence`` bool [Q, N], indexed by the
    batch's ``index``), then fills the budget by the stated rule: score :math:`2 e_j + c_j` with :math:`e_j`
    the evidence indicator and :math:`c_j` the patch's foreground fraction (:func:`object_scores`), ties by
    patch index. Evidence patches most covered first, then other objects' (and clutter) patches, then
    background in index order."""
    ratio = check_ratio(ratio)

    def keep_fn(batch, vlm):
        ev = evidence.to(batch["input_ids"].device)[batch["index"]].float()
        cover = object_scores(batch, vlm)
        if batch.get("image_index") is not None:
            cover = cover[batch["image_index"]]
        if ev.shape != cover.shape:
            raise ValueError(f"evidence must have {cover.shape[1]} patches per question, got {ev.shape[1]}")
        return topk_keep_mask(2.0 * ev + cover, ratio)

    return keep_fn


def evidence_recall(keep_mask: torch.Tensor, evidence_mask: torch.Tensor) -> torch.Tensor:
    r"""Per question, the fraction of its evidence patches that are kept,
    :math:`r = |K \cap E| / |E|` (``keep_mask`` and ``evidence_mask`` [B, N], 0/1); [B] float."""
    if keep_mask.shape != evidence_mask.shape or keep_mask.dim() != 2:
        raise ValueError(f"keep_mask and evidence_mask must both be [B, N], got {tuple(keep_mask.shape)} and "
                         f"{tuple(evidence_mask.shape)}")
    ev = evidence_mask.bool()
    n = ev.sum(-1)
    if not bool((n > 0).all()):
        raise ValueError("evidence_mask: every question needs at least one evidence patch")
    return (keep_mask.bool() & ev).sum(-1).float() / n.float()


@torch.no_grad()
def keep_masks(keep_fn, model, data, processor, batch_size: int = 256) -> torch.Tensor:
    """The keep masks bool [Q, N] (CPU) that ``keep_fn`` chooses for every question of ``data`` (an
    :class:`vtp.data.EncodedSplit`), in split order, without running the language model: with
    :func:`evidence_recall` it says which evidence each method keeps."""
    from .data import iterate_batches
    from .vlm import PrunedVLM

    vlm = model if isinstance(model, PrunedVLM) else PrunedVLM(model)
    data = data.to(next(vlm.parameters()).device)
    was_training = vlm.training
    vlm.eval()
    out = []
    try:
        for batch in iterate_batches(data, processor, batch_size):
            out.append(keep_fn(batch, vlm).bool().cpu())
            if hasattr(keep_fn, "discard"):  # no forward follows: a VisionZip merge must not wait for one
                keep_fn.discard()
    finally:
        vlm.train(was_training)
    return torch.cat(out)
