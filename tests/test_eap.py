"""Edge attribution patching: the graph, exact edge patching, EAP as its first-order estimate, EAP-IG, circuits."""
from __future__ import annotations

import pytest
import torch

from helpers.techniques import eap
from helpers.models.load import load_model
from tests.conftest import ARCHITECTURES, SYLLOGISM_PROMPTS

ANSWERS = torch.tensor([[5, 9], [9, 5], [5, 9], [9, 5]])


def logit_diff(logits):
    last = logits[:, -1]
    return (last.gather(1, ANSWERS[:, :1]) - last.gather(1, ANSWERS[:, 1:])).mean()


@pytest.fixture(scope="module")
def setups(tiny_checkpoint):
    """`setups(arch) -> (model, graph, clean, corrupted)`: the clean prompts and the same prompts rotated by one."""
    built = {}

    def get(architecture):
        if architecture not in built:
            model = load_model(tiny_checkpoint(architecture), device="cpu")
            clean = model.to_tokens(SYLLOGISM_PROMPTS)
            corrupted = model.to_tokens(SYLLOGISM_PROMPTS[1:] + SYLLOGISM_PROMPTS[:1])
            built[architecture] = model, eap.build_graph(model), clean, corrupted
        return built[architecture]

    return get


def test_graph_structure_follows_the_architecture(setups):
    model, graph, _, _ = setups("gpt_neox")       # parallel attention and MLP: no head -> same-layer MLP edge
    heads_of_layer1 = graph.sender_slice(1)
    assert not graph.edges[heads_of_layer1, graph.receivers.index(eap.Node("mlp", 1))].any()
    model, graph, _, _ = setups("gpt2")           # sequential: a layer's heads feed its MLP
    assert graph.edges[graph.sender_slice(1), graph.receivers.index(eap.Node("mlp", 1))][:-1].all()
    model, graph, _, _ = setups("llama")          # grouped-query attention: k and v receivers per key/value head
    n_kv = model.cfg.n_key_value_heads
    assert n_kv < model.cfg.n_heads
    assert sum(node.kind == "kv_head" and node.layer == 0 for node in graph.receivers) == 2 * n_kv
    # every sender feeds the logits; nothing feeds the input or writes backwards
    assert graph.edges[:, -1].all()
    layer0_q = graph.receivers.index(eap.Node("head", 0, 0, "q"))
    assert graph.edges[:, layer0_q].tolist() == [True] + [False] * (len(graph.senders) - 1)


def test_gpt_neo_attention_is_one_receiver_per_layer(setups):
    _, graph, _, _ = setups("gpt_neo")
    assert not graph.per_head_inputs
    assert [node.label for node in graph.receivers] == ["ATTN0.in", "MLP0", "ATTN1.in", "MLP1", "LOGITS"]


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_patching_no_edge_is_clean_and_every_edge_is_corrupted(setups, architecture):
    model, graph, clean, corrupted = setups(architecture)
    with torch.no_grad():
        clean_logits, corrupted_logits = model(clean), model(corrupted)
    none = eap.edge_patched_logits(model, clean, corrupted, graph, torch.zeros_like(graph.edges))
    every = eap.edge_patched_logits(model, clean, corrupted, graph, torch.ones_like(graph.edges))
    torch.testing.assert_close(none, clean_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(every, corrupted_logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_a_circuit_patches_alike_alone_or_batched(setups, architecture, monkeypatch):
    """A circuit's logits do not depend on the circuits it shares a pass with, nor on how many share one."""
    model, graph, clean, corrupted = setups(architecture)
    generator = torch.Generator().manual_seed(0)
    dense = (torch.rand(graph.edges.shape, generator=generator) < 0.9) & graph.edges
    sparse = (torch.rand(graph.edges.shape, generator=generator) < 0.1) & graph.edges
    batched = eap.edge_patched_logits(model, clean, corrupted, graph, torch.stack([dense, sparse]))
    for i, mask in enumerate((dense, sparse)):
        alone = eap.edge_patched_logits(model, clean, corrupted, graph, mask)
        torch.testing.assert_close(batched[i], alone, atol=1e-5, rtol=0)
    monkeypatch.setattr(eap, "EDGE_PATCH_BUDGET", 1)     # one circuit per pass
    torch.testing.assert_close(eap.edge_patched_logits(model, clean, corrupted, graph, torch.stack([dense, sparse])),
                               batched, atol=1e-5, rtol=0)


@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
def test_scores_from_passes_of_a_few_rows_equal_one_pass(setups, architecture, monkeypatch):
    """A backward pass over a few rows at a time (the others constant at their own values) gives the same
    gradients, so the same scores, for a metric of the whole batch (a mean of per-row logit differences)."""
    model, graph, clean, corrupted = setups(architecture)
    metric = lambda logits: logits[:, -1, 5].mean() - logits[::2, -1, 9].mean()    # noqa: E731  rows unequal
    whole = eap.edge_scores(model, clean, corrupted, metric, graph=graph, ig_steps=2)
    monkeypatch.setattr(eap, "GRADIENT_BUDGET", 1)                                 # one row per pass
    torch.testing.assert_close(eap.edge_scores(model, clean, corrupted, metric, graph=graph, ig_steps=2), whole,
                               atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("architecture", ["gpt_neox", "llama"])
def test_unembedding_only_the_positions_read_changes_nothing(setups, architecture, monkeypatch):
    """A plain metric's reads are learned (`patching.learn_reads`) and only those positions are unembedded: the
    scores and the circuits' metrics equal those computed from every logit."""
    model, graph, clean, corrupted = setups(architecture)
    scores = eap.edge_scores(model, clean, corrupted, logit_diff, graph=graph, ig_steps=2)
    circuits = torch.stack([graph.edges, torch.zeros_like(graph.edges), eap.top_edges(graph, scores, 12)])
    metrics = eap.edge_patched_metrics(model, clean, corrupted, graph, circuits, logit_diff)
    monkeypatch.setattr(eap, "learn_reads", lambda metric, runs: metric)
    torch.testing.assert_close(scores, eap.edge_scores(model, clean, corrupted, logit_diff, graph=graph, ig_steps=2),
                               atol=1e-6, rtol=1e-5)
    assert metrics == pytest.approx(eap.edge_patched_metrics(model, clean, corrupted, graph, circuits, logit_diff),
                                    abs=1e-6)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_eap_is_the_derivative_of_exact_edge_patching(setups, architecture):
    """Patching an edge a fraction alpha of the way changes the metric by alpha * EAP score, to first order."""
    model, graph, clean, corrupted = setups(architecture)
    scores = eap.edge_scores(model, clean, corrupted, logit_diff, graph=graph)
    generator = torch.Generator().manual_seed(0)
    edges = graph.edges.nonzero()
    for s, r in edges[torch.randperm(len(edges), generator=generator)[:8]].tolist():
        mask = torch.zeros_like(graph.edges)
        mask[s, r] = True
        step = 1e-2
        plus = logit_diff(eap.edge_patched_logits(model, clean, corrupted, graph, mask, alpha=step))
        minus = logit_diff(eap.edge_patched_logits(model, clean, corrupted, graph, mask, alpha=-step))
        derivative = float(plus - minus) / (2 * step)
        assert scores[s, r] == pytest.approx(derivative, rel=0.05, abs=2e-6), graph.edge_labels(mask)


def test_one_ig_step_is_eap_and_many_steps_come_closer_to_exact_patching(setups):
    model, graph, clean, corrupted = setups("gpt_neox")
    eap_scores = eap.edge_scores(model, clean, corrupted, logit_diff, graph=graph)
    torch.testing.assert_close(eap.edge_scores(model, clean, corrupted, logit_diff, graph=graph, ig_steps=1),
                               eap_scores)
    ig_scores = eap.edge_scores(model, clean, corrupted, logit_diff, graph=graph, ig_steps=10)
    exact = eap.exact_edge_effects(model, clean, corrupted, logit_diff, graph)
    error = {name: (scores - exact)[graph.edges].abs().mean() for name, scores in
             (("EAP", eap_scores), ("EAP-IG", ig_scores))}
    assert error["EAP-IG"] < error["EAP"]


def test_identical_inputs_give_zero_scores_and_change_nothing(setups):
    model, graph, clean, _ = setups("gpt2")
    scores = eap.edge_scores(model, clean, clean, logit_diff, graph=graph, ig_steps=3)
    assert scores.abs().max() == 0
    patched = eap.edge_patched_logits(model, clean, clean, graph, torch.ones_like(graph.edges))
    torch.testing.assert_close(patched, model(clean), atol=1e-5, rtol=0)


def test_full_circuit_is_faithful_and_empty_circuit_is_not(setups):
    model, graph, clean, corrupted = setups("llama")
    scores = eap.edge_scores(model, clean, corrupted, logit_diff, graph=graph)
    curve = eap.faithfulness_curve(model, clean, corrupted, logit_diff, graph, scores, [0, graph.n_edges])
    assert curve.kept == [0, graph.n_edges]
    assert curve.faithfulness == pytest.approx([0.0, 1.0], abs=1e-3)


def test_top_edges_and_pruning_keep_only_connected_paths(setups):
    _, graph, _, _ = setups("gpt2")
    sender = {node.label: i for i, node in enumerate(graph.senders)}
    receiver = {node.label: i for i, node in enumerate(graph.receivers)}
    scores = torch.zeros(graph.edges.shape)
    scores[sender["INPUT"], receiver["L0H1.q"]] = 5.0       # a path INPUT -> L0H1 -> LOGITS
    scores[sender["L0H1"], receiver["LOGITS"]] = -4.0
    scores[sender["L0H2"], receiver["LOGITS"]] = 3.0         # L0H2 reads nothing in the circuit: dangling
    scores[sender["INPUT"], receiver["L1H0.q"]] = 2.0        # L1H0 writes nowhere: dangling
    circuit = eap.top_edges(graph, scores, 4)
    assert set(graph.edge_labels(circuit)) == {"INPUT->L0H1.q", "L0H1->LOGITS"}
    assert set(graph.edge_labels(eap.top_edges(graph, scores, 4, prune=False))) == {
        "INPUT->L0H1.q", "L0H1->LOGITS", "L0H2->LOGITS", "INPUT->L1H0.q"}
    with pytest.raises(ValueError, match="n_edges"):
        eap.top_edges(graph, scores, graph.n_edges + 1)


def test_key_value_input_feeds_its_whole_group(setups):
    model, graph, _, _ = setups("llama")
    group = model.cfg.n_heads // model.cfg.n_key_value_heads
    sender = {node.label: i for i, node in enumerate(graph.senders)}
    receiver = {node.label: i for i, node in enumerate(graph.receivers)}
    circuit = torch.zeros_like(graph.edges)
    circuit[sender["INPUT"], receiver["L1KV1.k"]] = True
    circuit[sender[f"L1H{group + 1}"], receiver["LOGITS"]] = True  # a query head of group 1
    assert eap.prune_dangling(graph, circuit).sum() == 2


def test_bad_input_is_named(setups):
    model, graph, clean, corrupted = setups("gpt2")
    with pytest.raises(ValueError, match="ig_steps"):
        eap.edge_scores(model, clean, corrupted, logit_diff, graph=graph, ig_steps=0)
    with pytest.raises(ValueError, match="shape"):
        eap.edge_scores(model, clean, corrupted[:, :-1], logit_diff, graph=graph)


def test_node_circuits_round_trip_and_evaluate(setups):
    model, graph, clean, corrupted = setups("llama")
    every_node = {node.label for node in graph.senders} | {"LOGITS"}
    assert torch.equal(eap.circuit_from_nodes(graph, every_node), graph.edges)
    assert eap.circuit_nodes(graph, graph.edges) == every_node
    # a node circuit keeps exactly the edges among its nodes; heads outside it neither send nor receive
    chosen = {"L0H1", "MLP0", "L1H3"}
    circuit = eap.circuit_from_nodes(graph, chosen)
    assert eap.circuit_nodes(graph, circuit) == chosen | {"INPUT", "LOGITS"}
    assert {label.split("->")[0] for label in graph.edge_labels(circuit)} == chosen | {"INPUT"}
    full, empty = eap.circuit_faithfulness(model, clean, corrupted, logit_diff, graph,
                                           [graph.edges, torch.zeros_like(graph.edges)])
    assert (full, empty) == pytest.approx((1.0, 0.0), abs=1e-3)


def test_circuit_drawing_places_every_edge(setups):
    from helpers.notebook.plotting import EDGE_WIDTHS, circuit_graph

    _, graph, _, _ = setups("gpt2")
    scores = torch.randn(graph.edges.shape, generator=torch.Generator().manual_seed(0))
    circuit = eap.top_edges(graph, scores, 12)
    labels, positions, edges = eap.circuit_drawing(graph, circuit, scores)
    assert set(labels) == eap.circuit_nodes(graph, circuit)
    assert len(edges) == int(circuit.sum())                 # no GQA here: one drawn line per edge
    assert positions[labels.index("INPUT")][1] == -1 and positions[labels.index("LOGITS")][1] == graph.n_layers
    figure = circuit_graph(labels, positions, edges, show=False)
    drawn = [(x, y) for trace in figure.data[:-1] for x, y in zip(trace.x[::3], trace.y[::3])]   # each edge's start
    assert sorted(drawn) == sorted(positions[start] for start, _, _ in edges)
    assert {trace.line.color for trace in figure.data[:-1]} == {"#2166ac", "#b2182b"}   # both signs drawn
    assert len(figure.data) <= 2 * (EDGE_WIDTHS + 1) + 1


def test_size_grid_and_smallest_faithful():
    assert eap.size_grid(1000, 4) == [0, 1, 10, 100, 1000]
    assert eap.size_grid(3, 12) == [0, 1, 2, 3]
    curve = eap.CircuitCurve([0, 5, 10], [0, 5, 9], [0.0, 0.7, 0.95], 1.0, 0.0)
    assert eap.smallest_faithful(curve, 0.9) == 2 and eap.smallest_faithful(curve, 0.99) is None


def test_compare_with_manual_evaluates_both_circuits_on_held_out_prompts(setups):
    model, graph, clean, corrupted = setups("gpt2")
    discovery = eap.PromptSet(clean, corrupted, logit_diff)
    held_out = eap.PromptSet(corrupted, clean, lambda logits: -logit_diff(logits))   # the flipped task
    manual = {"L0H1", "MLP0", "L1H2", "MLP1"}
    result = eap.compare_with_manual(model, graph, discovery, held_out, manual, ig_steps=2, target=0.5,
                                     sizes=[0, 8, 32, graph.n_edges])
    torch.testing.assert_close(result.scores, eap.edge_scores(model, clean, corrupted, logit_diff, graph=graph,
                                                              ig_steps=2))
    assert result.curve.faithfulness[0] == pytest.approx(0.0, abs=1e-3)
    assert result.curve.faithfulness[-1] == pytest.approx(1.0, abs=1e-3)
    assert torch.equal(result.manual, eap.circuit_from_nodes(graph, manual))
    expected = eap.circuit_faithfulness(model, corrupted, clean, held_out.metric, graph, [result.manual])[0]
    assert result.manual_faithfulness == pytest.approx(expected, abs=1e-5)
    found = eap.circuit_nodes(graph, result.circuit) - {"INPUT", "LOGITS"}
    assert result.jaccard == pytest.approx(len(found & manual) / len(found | manual))
    reached = [f for f in result.curve.faithfulness if f >= 0.5]
    assert result.reaches_target == bool(reached)
