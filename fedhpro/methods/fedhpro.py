"""FedHPro (Wang et al., ICML 2026): federated hyper-prototype learning via gradient matching.

Follows the official code (mala-lab/FedHPro `main_run.py`, see
`docs/fedhpro-official-code.md`) by default; every quirk is a switch:

- clients send per class the mean feature-gradient of CE through the
  classifier (1/n^2 scaling, docs section 2.1) and CReFF's classifier gradients;
- the new global model is the LAST sampled client's locally trained model
  (`aggregation: last_client`, the default), not an average. This is what the
  official code computes, though `get_agg_params` is written as a FedAvg:
  `Local.local_train` returns `self.local_model.state_dict()` (references to
  the live tensors, not copies), `FedHPro()` appends it without
  `copy.deepcopy` (CReFF deep-copies there), and the one reused `Local` object
  loads the next client's start weights into the same tensors in place. When
  the client loop ends every list entry is the last client's model, so the
  "weighted average" is that model exactly (weights, BN statistics and
  `num_batches_tracked`; sample counts have no effect), and the client order
  of `RandomState(seed).choice` decides each round which client that is. The
  published numbers depend on this. `aggregation: fedavg` is the
  sample-weighted mean the code was meant to compute. Either way every client
  uploads its model (and the bytes count it), the hyper-prototypes use every
  client's gradients, and then
- the server matches CReFF federated features, re-trains a linear classifier
  on them (`classifier_retraining`), puts it in place of the aggregate's
  `classifier.*` and sends it to clients next round
  (`send_retrained_classifier`, quirk 6);
- then it runs `matching_steps` SGD steps on the hyper-prototypes H (C*L x d)
  so that their CE feature-gradients through the classifier (the re-trained
  one, quirk 2: `matching_classifier`) match the clients', with the official
  element-wise `distance: matching` (quirk 1) or `cos`/`mse`;
- local loss = CE + HPCL + HPAL; HPCL divides by B twice (quirk 4,
  `hpcl_batch_scale`), uses the mean of L2-normalised hyper-prototypes while
  HPAL uses the normalised mean (quirk 5); the client margin is off
  (`use_margin`, quirk 3) and, when on, recomputed every batch with a
  train-mode pass as in the code (`margin_update: round` is the cheap option).

Deliberate differences: randomness is seeded (the official DSA reseeds torch
from the clock, quirk 8), and the model leaves out the unused `encoder`.
Prediction (`predict`): the classifier (official), or `nearest_hyperprototype`: the class whose
hyper-prototype centre (mean of its L2-normalised hyper-prototypes, HPCL's centre) has the largest cosine
with the sample's feature, scores = cosine / temperature, which measures the class information of the
hyper-prototypes themselves (either mode; for the global model or each client's extractor).
Ablations: `hpcl`/`hpal` off, `use_margin`, `prototype_source: random` (no
gradient matching: H stays at its N(0,1) init) or `average` (H = averaged
client class-mean features, FedProto-style).
The paper-style variant is `distance: cos, use_margin: true, hpcl_batch_scale: false`.

Personalized mode and heterogeneous client models (`eval_mode: personalized`, `client_models: [...]`)
are a reconstruction [recon]: the paper compares FedHPro with FedProto/FedTGP/FedSA under model
heterogeneity but no code for it is public. Design, chosen so that every server step of the global
code keeps its meaning:

- each client's feature extractor (backbone + projection to the shared d, `fedhpro.models`) never
  leaves the client (per-client state, as every personalized method here); only the homogeneous
  classifier head `nn.Linear(d, C)` is shared. The server's head starts as the round-1 meta
  classifier (one random `nn.Linear(d, C)`; the global code draws a separate one for the model);
- down: the head and the hyper-prototypes H (plus the re-trained classifier as `meta_*` only when
  `send_retrained_classifier: false`, since clients then train with the aggregated head but compute
  their gradients through the re-trained one, as in global mode). A client puts the head in place of
  its own classifier and trains extractor and head with CE + HPCL + HPAL against H;
- up: as in global mode, per class the CE feature-gradient and CReFF's classifier gradients through the
  head it received (its own extractor, before local training), and its trained head only where the
  server uses it (`head_is_aggregated`: not when the re-trained classifier replaces the aggregate, the
  default, so no client uploads a head nobody reads and `aggregation` has nothing to act on there;
  the run's `aggregation` column then says `retrained_head`);
- server: where uploaded, the heads are aggregated with `aggregation` (`last_client`: the last sampled
  client's head, the global code's outcome; `fedavg`: the sample-weighted mean), then the CReFF federated
  features are matched, a classifier is re-trained on them and, with `send_retrained_classifier`, is the
  head; then H is matched through `matching_classifier` exactly as in global mode;
- evaluation (client accuracy on its local test split): each client's own extractor, as left by its
  last local training, with the current shared head (what every client holds after the next
  broadcast). This is HtFLlib's protocol for head-sharing methods (FedGH, LG-FedAvg: the server's
  `send_parameters` hands the global head to every client before `evaluate`), and the head the
  server trains on federated features is the point of CReFF/FedHPro; a client's locally trained head
  is discarded on the next broadcast. Clients never sampled use their initial extractor.
  Bytes count what the sampled clients receive and send (head + H down; gradients, and the head where
  it is aggregated, up; no extractor weights), as for every method; evaluating unsampled clients with the current head
  assumes they receive it too (HtFLlib sends the head to all clients), which is not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedhpro.engine import ClientBase, Context, ServerBase
from fedhpro.lazy import lazy_module
from fedhpro.methods import Method, param
from fedhpro.methods.creff import FederatedFeatures, client_class_gradients, mean_over_clients
from fedhpro.methods.gradients import synthetic_gradients, vector_distance

torch = lazy_module("torch")
F = lazy_module("torch.nn.functional")
nn = lazy_module("torch.nn")

HEAD_KEYS = ("classifier.weight", "classifier.bias")  # the shared head in personalized mode


@dataclass(frozen=True)
class Params:
    aggregation: str = param("last_client", "global model after local training: the last sampled client's model "
                             "(what the official code computes: its state_dicts alias one reused model) or the "
                             "sample-weighted mean (fedavg, what it was written to compute)",
                             choices=("last_client", "fedavg"))
    prototypes_per_class: int = param(5, "hyper-prototypes L per class (--length_of_hp)", low=1)
    matching_steps: int = param(30, "SGD steps on the hyper-prototypes per round (--rounds_of_hp)", low=0)
    prototype_lr: float = param(0.1, "learning rate of hyper-prototypes and federated features (--lr_hp)",
                                low=0.0, low_inclusive=False)
    temperature: float = param(0.05, "HPCL temperature tau (--hp_info_t)", low=0.0, low_inclusive=False)
    distance: str = param("matching", "gradient matching distance (--dis_metric; matching is element-wise)",
                          choices=("matching", "cos", "mse"))
    matching_classifier: str = param("retrained", "classifier the server matches through: the one re-trained "
                                     "this round (official) or the one clients used", choices=("retrained", "current"))
    prototype_source: str = param("matching", "how hyper-prototypes are obtained (ablation: random = no matching, "
                                  "average = mean client features)", choices=("matching", "random", "average"))
    hpcl: bool = param(True, "hyper-prototype contrastive loss")
    hpal: bool = param(True, "hyper-prototype alignment loss")
    hpcl_weight: float = param(1.0, "HPCL weight (official: 1)", low=0.0)
    hpal_weight: float = param(1.0, "HPAL weight (official: 1)", low=0.0)
    hpcl_batch_scale: bool = param(True, "divide HPCL by the batch size a second time (official quirk)")
    use_margin: bool = param(False, "client-specific margin m_k in the HPCL denominator (official default off)")
    margin_update: str = param("batch", "when m_k is recomputed: every batch (official) or once per round",
                               choices=("batch", "round"))
    real_batch: int = param(100, "real samples per class for the client gradient (--batch_real)", low=1)
    repeats: int = param(1, "random real batches per class (--repeat_num)", low=1)
    dsa: bool = param(True, "Siamese augmentation of the real batches (--method DSA)")
    classifier_retraining: bool = param(True, "CReFF federated features + classifier re-training")
    send_retrained_classifier: bool = param(True, "send the re-trained classifier to clients (official)")
    features_per_class: int = param(50, "CReFF federated features per class (--meta_length)", low=1)
    feature_matching_steps: int = param(100, "SGD steps on the federated features per round", low=0)
    retrain_epochs: int = param(100, "classifier re-training epochs", low=1)
    retrain_batch: int = param(50, "classifier re-training batch size", low=1)
    retrain_lr: float = param(0.01, "classifier re-training learning rate", low=0.0, low_inclusive=False)
    predict: str = param("classifier", "prediction rule for evaluation: the classifier (official) or the nearest "
                         "hyper-prototype class centre by cosine", choices=("classifier", "nearest_hyperprototype"))


def head_is_aggregated(p: Params) -> bool:
    """Personalized [recon]: whether the server reads the clients' trained heads. Not when the re-trained
    classifier replaces the aggregate (the defaults): then no head is uploaded and `aggregation` is moot."""
    return not (p.classifier_retraining and p.send_retrained_classifier)


def weight_aggregation(cfg) -> str:
    """The run's `aggregation` column (`fedhpro.train.weight_aggregation`): in global mode the `aggregation`
    parameter; in personalized mode the shared head is the re-trained classifier when it replaces the aggregate
    (`retrained_head`), else `<aggregation>_head`."""
    from fedhpro.methods import make_params

    p = make_params("fedhpro", cfg.method_params)
    if cfg.eval_mode != "personalized":
        return p.aggregation
    return f"{p.aggregation}_head" if head_is_aggregated(p) else "retrained_head"


def hpcl_loss(features: torch.Tensor, labels: torch.Tensor, class_centres: torch.Tensor, temperature: float,
              margin: float | torch.Tensor = 0.0, batch_scale: bool = True) -> torch.Tensor:
    """Eq. 12 as coded: InfoNCE over all C classes with each class's mean cosine to its L prototypes.

    `class_centres` = mean of the L2-normalised hyper-prototypes (C x d, not re-normalised);
    a non-zero `margin` is added to the denominator in linear space; `batch_scale` divides by B again.
    """
    logits = F.normalize(features, dim=1) @ class_centres.T / temperature
    log_den = torch.logsumexp(logits, dim=1)
    margin = torch.as_tensor(margin, dtype=logits.dtype, device=logits.device)
    if bool(margin != 0):
        log_den = torch.logaddexp(log_den, margin.log())
    loss = (log_den - logits.gather(1, labels[:, None]).squeeze(1)).mean()
    return loss / features.shape[0] if batch_scale else loss


def hpal_loss(features: torch.Tensor, labels: torch.Tensor, class_means: torch.Tensor) -> torch.Tensor:
    """Eq. 13 as coded: SmoothL1(mean) between normalised features and normalise(mean of raw prototypes)."""
    return F.smooth_l1_loss(F.normalize(features, dim=1), F.normalize(class_means, dim=1)[labels])


def client_margin(class_means: torch.Tensor, num_classes: int) -> torch.Tensor:
    """m_k = sum over ordered pairs c != c' of <P_c, P_c'> / (C - 1)^2 (present classes only)."""
    products = class_means @ class_means.T
    return (products.sum() - products.diagonal().sum()) / (num_classes - 1) ** 2


def class_feature_means(model: nn.Module, ctx: Context, x: torch.Tensor, y: torch.Tensor,
                        batch_size: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class mean of model features over (x, y) with index_add_ (model mode left as is) -> (C x d, counts)."""
    sums = counts = None
    with torch.no_grad():
        for start in range(0, len(y), batch_size):
            f = model.features(ctx.prepare(x[start:start + batch_size], train=False))
            if f.dtype in (torch.bfloat16, torch.float16):  # the margin pass inside an autocast loss: fp32 means
                f = f.float()
            if sums is None:
                sums = torch.zeros(ctx.num_classes, f.shape[1], dtype=f.dtype, device=f.device)
                counts = torch.zeros(ctx.num_classes, dtype=f.dtype, device=f.device)
            labels = y[start:start + batch_size]
            sums.index_add_(0, labels, f)
            counts.index_add_(0, labels, torch.ones_like(labels, dtype=f.dtype))
    present = counts > 0
    sums[present] /= counts[present, None]
    return sums, counts


class Client(ClientBase):
    UPLOAD_METADATA = ("classes",)  # which classes the gradient rows belong to

    def setup(self, client, model, payload, state, gen, round_idx) -> None:
        p, c = self.params, self.ctx.num_classes
        self.client = client
        if "head" in payload:  # personalized [recon]: the shared head replaces the client's own classifier
            with torch.no_grad():
                model.classifier.weight.copy_(payload["head"]["classifier.weight"])
                model.classifier.bias.copy_(payload["head"]["classifier.bias"])
        hp = payload["hyper_prototypes"].view(c, p.prototypes_per_class, -1)
        self.class_centres = F.normalize(hp, dim=2).mean(1)  # HPCL: mean of normalised prototypes
        self.class_means = hp.mean(1)  # HPAL: normalised later
        weight, bias = payload.get("meta_weight", model.classifier.weight), payload.get("meta_bias",
                                                                                         model.classifier.bias)
        self.gradients = client_class_gradients(self.ctx, client, model, weight, bias, p.real_batch, p.repeats,
                                                p.dsa, gen)
        self.margin = torch.zeros((), device=self.ctx.device)
        if p.use_margin and p.margin_update == "round":
            self.margin = self._margin(model)

    def _margin(self, model: nn.Module) -> torch.Tensor:
        # Official compute_margin: a no-grad pass in the model's current (train) mode, so BN stats move.
        means, counts = class_feature_means(model, self.ctx, self.client.x, self.client.y)
        return client_margin(means[counts > 0], self.ctx.num_classes)

    def loss(self, model, x, y) -> torch.Tensor:
        p = self.params
        features, logits = model(x)
        loss = F.cross_entropy(logits, y)
        if p.hpcl:
            if p.use_margin and p.margin_update == "batch":
                self.margin = self._margin(model)
            loss = loss + p.hpcl_weight * hpcl_loss(features, y, self.class_centres, p.temperature, self.margin,
                                                    p.hpcl_batch_scale)
        if p.hpal:
            loss = loss + p.hpal_weight * hpal_loss(features, y, self.class_means)
        return loss

    def upload(self, client, model, state, round_idx) -> dict:
        g = self.gradients
        out = {"classes": g["classes"], "feature_grad": g["feature_grad"]}
        if self.params.classifier_retraining:
            out.update(grad_w=g["grad_w"], grad_b=g["grad_b"])
        if self.params.prototype_source == "average":
            model.eval()
            means, _ = class_feature_means(model, self.ctx, client.x, client.y)
            out["class_means"] = means[g["classes"]]
        if self.cfg.eval_mode == "personalized" and head_is_aggregated(self.params):
            # [recon] the trained head travels where the server aggregates it; the extractor stays
            out["head"] = {k: v.detach().clone() for k, v in model.state_dict().items() if k in HEAD_KEYS}
        return out


class Server(ServerBase):
    STATE = ("prototypes", "federated.features", "meta_weight", "meta_bias", "head")  # head: personalized only

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        p, c = self.params, ctx.num_classes
        d = self.model.feature_dim if self.model is not None else ctx.feature_dim
        # Official init order: H ~ N(0,1), then the federated features, then the round-1 meta classifier.
        self.prototypes = torch.randn(c * p.prototypes_per_class, d, device=ctx.device)
        self.labels = torch.arange(c, device=ctx.device).repeat_interleave(p.prototypes_per_class)
        self.federated = FederatedFeatures(c, p.features_per_class, d, p.prototype_lr, ctx.device)
        meta = nn.Linear(d, c).to(ctx.device)  # round 1: a separate random classifier (docs section 1, step 3)
        self.meta_weight, self.meta_bias = meta.weight.detach(), meta.bias.detach()
        # Personalized [recon]: the shared head (no global model); it starts as the round-1 meta classifier.
        self.head: dict[str, torch.Tensor] | None = None
        if self.model is None:
            self.head = {"classifier.weight": self.meta_weight.clone(), "classifier.bias": self.meta_bias.clone()}

    def broadcast(self, round_idx: int) -> dict:
        p = self.params
        payload = {**super().broadcast(round_idx), "hyper_prototypes": self.prototypes}
        if self.head is not None:
            payload["head"] = self.head
            # With the re-trained head sent, the head clients train with is the one they compute gradients
            # through: sending it twice would only count bytes twice.
            if p.classifier_retraining and not p.send_retrained_classifier:
                payload.update(meta_weight=self.meta_weight, meta_bias=self.meta_bias)
        elif p.classifier_retraining:
            payload.update(meta_weight=self.meta_weight, meta_bias=self.meta_bias)
        return payload

    def current_head(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The classifier clients hold now: the global model's (global mode) or the shared head."""
        if self.head is not None:
            return self.head["classifier.weight"], self.head["classifier.bias"]
        return self.model.classifier.weight.detach(), self.model.classifier.bias.detach()

    def aggregate(self, round_idx: int, uploads: list[dict]) -> None:
        p, c = self.params, self.ctx.num_classes
        if p.classifier_retraining:
            used_w, used_b = self.meta_weight, self.meta_bias
        else:
            used_w, used_b = (t.clone() for t in self.current_head())
        super().aggregate(round_idx, uploads)  # global mode: `aggregate_weights` below, last client or FedAvg
        if self.head is not None and head_is_aggregated(p):  # personalized: the same rule on the uploaded heads
            self.head = self.aggregate_weights([{"weights": u["head"], "num_samples": u["num_samples"]}
                                                for u in uploads])
        if p.classifier_retraining:  # S1-S3
            dw, present = mean_over_clients(uploads, "grad_w", c)
            db, _ = mean_over_clients(uploads, "grad_b", c)
            self.federated.match(used_w, used_b, dw, db, present, p.feature_matching_steps, p.distance)
            gen = torch.Generator().manual_seed(int(torch.randint(0, 2**62, ())))
            head = self.federated.retrain_classifier(p.retrain_epochs, p.retrain_batch, p.retrain_lr, gen)
            self.meta_weight, self.meta_bias = head.weight.detach(), head.bias.detach()
            if p.send_retrained_classifier:
                if self.head is not None:
                    self.head = {"classifier.weight": self.meta_weight, "classifier.bias": self.meta_bias}
                else:
                    with torch.no_grad():
                        self.model.classifier.weight.copy_(self.meta_weight)
                        self.model.classifier.bias.copy_(self.meta_bias)
        if p.matching_classifier == "retrained":
            match_w, match_b = (self.meta_weight, self.meta_bias) if p.classifier_retraining else self.current_head()
        else:
            match_w, match_b = used_w, used_b
        if p.prototype_source == "matching":  # S4
            real, present = mean_over_clients(uploads, "feature_grad", c)
            self.prototypes = match_prototypes(self.prototypes, self.labels, match_w, match_b, real, present,
                                               p.prototypes_per_class, p.matching_steps, p.prototype_lr, p.distance)
        elif p.prototype_source == "average":
            means, present = mean_over_clients(uploads, "class_means", c)
            view = self.prototypes.view(c, p.prototypes_per_class, -1).clone()
            view[present] = means[present][:, None, :]
            self.prototypes = view.view(c * p.prototypes_per_class, -1)

    def global_class_signal(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Diagnostics: per class the mean of its L hyper-prototypes (the direction HPAL aligns features to)."""
        c = self.ctx.num_classes
        means = self.prototypes.view(c, self.params.prototypes_per_class, -1).mean(1)
        return means, torch.ones(c, dtype=torch.bool, device=means.device)

    def aggregate_weights(self, uploads: list[dict]) -> dict[str, torch.Tensor]:
        if self.params.aggregation == "last_client":  # official: every state_dict aliases the last client's
            return uploads[-1]["weights"]
        return super().aggregate_weights(uploads)

    def scores(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        p = self.params
        if p.predict == "nearest_hyperprototype":  # cosine to each class's HPCL centre, as a logit
            centres = F.normalize(self.prototypes.view(self.ctx.num_classes, p.prototypes_per_class, -1), dim=2)
            return F.normalize(model.features(x), dim=1) @ centres.mean(1).T / p.temperature
        if self.head is None:
            return model(x)[1]
        # Personalized: the client's own extractor with the current shared head (HtFLlib's head-sharing protocol)
        return F.linear(model.features(x), self.head["classifier.weight"], self.head["classifier.bias"])


def match_prototypes(prototypes: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                     real: torch.Tensor, present: torch.Tensor, per_class: int, steps: int, lr: float,
                     distance: str) -> torch.Tensor:
    """`obtain_hyper_prototypes`: SGD on H so that, for every class with client gradients, the mean over
    its L prototypes of dCE/ds through the classifier matches the clients' mean feature-gradient."""
    classes = torch.nonzero(present).flatten()
    if classes.numel() == 0 or steps == 0:
        return prototypes
    rows = (classes[:, None] * per_class + torch.arange(per_class, device=classes.device)).flatten()
    block = prototypes[rows].clone().requires_grad_(True)
    weight, bias = weight.detach(), bias.detach()
    for _ in range(steps):
        syn, _, _ = synthetic_gradients(block, labels[rows], weight, bias, per_class)
        loss = vector_distance(distance, real[classes], syn).sum()
        (grad,) = torch.autograd.grad(loss, block)
        with torch.no_grad():
            block -= lr * grad
    out = prototypes.clone()
    out[rows] = block.detach()
    return out


# how the runs' `aggregation` column reads in tables and figures (`weight_aggregation` writes it)
AGGREGATION_NAMES = {"last_client": "last-client aggregation", "fedavg": "FedAvg aggregation",
                     "last_client_head": "last-client head aggregation", "fedavg_head": "FedAvg head aggregation",
                     "retrained_head": "re-trained head, not aggregated"}


def row_label(display: str, variant: str, aggregation: str | None) -> str | None:
    """A table row's name, which says how the global model (or the shared head) was formed; None (the generic
    name) for an unknown aggregation."""
    if aggregation not in AGGREGATION_NAMES:
        return None
    if aggregation.endswith("_head"):  # personalized mode: a reconstruction, never "the official code"
        what = AGGREGATION_NAMES[aggregation]
        return f"{display} [recon] ({what})" if variant == "default" else f"{display} [recon] ({variant}, {what})"
    if variant == "default" and aggregation == "last_client":
        return f"{display} (official code)"
    if variant in ("default", "fedavg") and aggregation == "fedavg":
        return f"{display} (FedAvg aggregation)"
    variant = variant.removesuffix("_fedavg") if aggregation == "fedavg" else variant
    return f"{display} ({variant}, {AGGREGATION_NAMES[aggregation]})"


METHOD = Method(
    name="fedhpro",
    paper="Wang et al., FedHPro: Federated Hyper-Prototype Learning via Gradient Matching, ICML 2026",
    display="FedHPro",
    order=11,
    style={"color": "#CC3311", "marker": "*", "linestyle": "-", "linewidth": 2.0, "markersize": 7},
    modes=("global", "personalized"),
    communicates="weights + hyper-prototypes (down); weights + per-class feature and classifier gradients (up); "
                 "personalized [recon]: classifier head instead of the weights (up only where it is aggregated)",
    Params=Params,
    Client=Client,
    Server=Server,
    heterogeneous_models=True,  # personalized mode only [recon]: local extractors, one shared classifier head
    # Seconds-long digits runs (tests, quick benchmarks): fewer prototypes, server steps and re-training epochs.
    fast_test_params={"prototypes_per_class": 2, "matching_steps": 5, "features_per_class": 10,
                      "feature_matching_steps": 5, "retrain_epochs": 20, "real_batch": 32},
    revisions=("global model = the last sampled client's trained model, as the official code runs (was: FedAvg); "
               "`aggregation: fedavg` keeps the mean",),
    weight_aggregation=weight_aggregation,
    proposed=True,
    upload_note=("FedHPro uploads, besides what the prototype baselines send, one classifier gradient per class it "
                 "holds (for gradient matching; each the size of the classifier, so about classes x the prototype "
                 "upload)."),
    # main-table rows: as published (`default`) and with real FedAvg aggregation (`fedavg`), and the paper-text
    # variant with each aggregation; its other variants are ablations
    main_variants=("default", "fedavg", "paper", "paper_fedavg"),
    # one red-orange family, told apart by lightness, marker and line style
    variant_styles={"fedavg": {"color": "#EE7733", "marker": "P", "linestyle": "--", "linewidth": 1.8},
                    "paper": {"color": "#661100", "marker": "d", "linestyle": "-.", "linewidth": 1.8},
                    "paper_fedavg": {"color": "#EE99AA", "marker": "8", "linestyle": ":", "linewidth": 1.8}},
    aggregation_names=AGGREGATION_NAMES,
    row_label=row_label,
    notes=((("last_client", "fedavg"),
            "FedHPro \"official code\" / \"last-client aggregation\": each round's global model is the last sampled "
            "client's trained model (with the re-trained classifier), which is what the official code computes "
            "(`aggregation: last_client`); \"FedAvg aggregation\": the sample-weighted mean of the client models "
            "(`aggregation: fedavg`)."),
           (("last_client_head", "fedavg_head", "retrained_head"),
            "\"[recon]\": FedHPro with heterogeneous models (personalized mode; reconstructed, no public code), "
            "whose shared classifier head is aggregated by the named rule.")),
)
