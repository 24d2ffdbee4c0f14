"""Silhouette against scikit-learn on features the test pools itself, on clusters of known separation,
and both callbacks' TensorBoard output read back from the event files of a real (tiny) fit."""

import copy

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from sklearn.metrics import silhouette_score
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_moo.callbacks.neurons import NeuronSpecificity
from lightning_moo.callbacks.silhouette import Silhouette, pooled_hidden_states, silhouette_per_layer
from test_neurons import recorded_gates, reference_lape
from tiny_lm import LANGUAGES, TinyLM, make_llama, make_texts, make_tokenizer


def own_pooled_features(model, tokenizer, texts):
    """[layers + 1, sentences, hidden]: each sentence run alone (no padding), its states averaged."""
    rows = []
    with torch.no_grad():
        for sentences in texts.values():
            for sentence in sentences:
                ids = torch.tensor([tokenizer(sentence)["input_ids"]])
                states = model(input_ids=ids, output_hidden_states=True).hidden_states
                rows.append(torch.stack([s[0].double().mean(dim=0) for s in states]))
    return torch.stack(rows, dim=1).numpy()


def own_scores(features, labels):
    return {m: [silhouette_score(f, labels, metric=m) for f in features] for m in ("cosine", "euclidean")}


def test_pooled_features_and_scores_match_sklearn():
    model, tokenizer, texts = make_llama(seed=1), make_tokenizer(), make_texts(sentences=9, seed=2)
    features, labels = pooled_hidden_states(model, tokenizer, texts, batch_size=4)
    expected = own_pooled_features(model, tokenizer, texts)
    np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-5)  # padding left out of the mean
    assert labels.tolist() == [j for j in range(len(LANGUAGES)) for _ in range(9)]
    scores = silhouette_per_layer(features, labels)
    reference = own_scores(expected, labels)
    for metric in reference:
        np.testing.assert_allclose(scores[metric], reference[metric], atol=1e-5)


def test_known_separation():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 200)
    centres = np.array([[50.0, 0, 0, 0], [0, 50.0, 0, 0], [0, 0, 50.0, 0]])
    separated = centres[labels] + rng.normal(size=(600, 4))
    mixed = rng.normal(size=(600, 4)) + 3.0  # offset so cosine distances are well defined
    scores = silhouette_per_layer(np.stack([separated, mixed]), labels)
    for metric in ("cosine", "euclidean"):
        assert scores[metric][0] > 0.9
        assert abs(scores[metric][1]) < 0.05


def test_event_files_hold_the_logged_values(tmp_path):
    tokenizer, texts = make_tokenizer(), make_texts(sentences=8, seed=5)
    model = make_llama(seed=7).train()
    before = copy.deepcopy(model).eval()
    module = TinyLM(model, tokenizer, texts)
    logger = TensorBoardLogger(tmp_path, name="run")
    silhouette = Silhouette(texts, batch_size=3, projector_layers=[1, -1])
    neurons = NeuronSpecificity(texts, batch_size=3, top_share=0.05, run_at=("fit_start", "fit_end"))
    trainer = L.Trainer(
        max_epochs=1, logger=logger, callbacks=[silhouette, neurons], accelerator="cpu", devices=1,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, log_every_n_steps=1,
    )
    trainer.fit(module)
    assert trainer.global_step == 2
    assert model.training  # the callbacks evaluate in eval mode and restore the training mode
    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    logged = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}

    labels = np.repeat(np.arange(len(LANGUAGES)), 8)
    # Training moved the representations, so steps 0 and 2 tell the two model states apart.
    assert logged["silhouette/cosine/layer_1"][0] != pytest.approx(logged["silhouette/cosine/layer_1"][2], abs=1e-3)
    layers = model.config.num_hidden_layers + 1
    # Step 0 is fit start (the untrained copy); step 2 is the validation after training.
    for step, state in ((0, before), (2, model)):
        reference = own_scores(own_pooled_features(state.eval(), tokenizer, texts), labels)
        for metric, values in reference.items():
            for i in range(layers):
                assert logged[f"silhouette/{metric}/layer_{i}"][step] == pytest.approx(values[i], abs=1e-4)

    for step, state in ((0, before), (2, model)):
        probs, _, _, selected, languages = reference_lape(
            recorded_gates(state, tokenizer, texts), share=0.05, quantile=0.95
        )
        n_layers, width = probs.shape[:2]
        for i in range(n_layers):
            ratio = sum(1 for layer, _ in selected if layer == i) / width
            assert logged[f"neurons/layer_{i}/ratio"][step] == pytest.approx(ratio)
        assert logged["neurons/total/ratio"][step] == pytest.approx(len(selected) / (n_layers * width))
        for lang in LANGUAGES:
            count = sum(lang in langs for langs in languages.values())
            assert logged[f"neurons/{lang}/count"][step] == count
        saved = torch.load(f"{logger.log_dir}/language_neurons/step_{step}.pt")
        for lang, per_layer in saved["neurons"].items():
            assert {(i, n) for i, ns in enumerate(per_layer) for n in ns} == {
                key for key, langs in languages.items() if lang in langs
            }

    assert {"silhouette/curve", "neurons/per_layer"} <= set(events.Tags()["images"])
    assert [e.step for e in events.Images("silhouette/curve")] == [0, 2]
    run_dir = tmp_path / "run" / "version_0"
    projector = (run_dir / "projector_config.pbtxt").read_text()
    last = f"silhouette/layer_{layers - 1}:00002"
    assert 'tensor_name: "silhouette/layer_1:00000"' in projector and f'tensor_name: "{last}"' in projector
    entry = projector[projector.index(last) :]
    folder = run_dir / entry.split('metadata_path: "')[1].split('"')[0].rsplit("/", 1)[0]
    rows = (folder / "metadata.tsv").read_text().splitlines()
    assert rows[0] == "language\tsentence"
    assert rows[1:] == [f"{lang}\t{k}" for lang in LANGUAGES for k in range(8)]
    vectors = np.loadtxt(folder / "tensors.tsv", delimiter="\t")
    np.testing.assert_allclose(vectors, own_pooled_features(model, tokenizer, texts)[-1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("callback", [Silhouette, NeuronSpecificity])
def test_sharded_weights_are_refused_before_a_rank_zero_forward_could_hang(callback):
    """Rank zero measures alone; under ZeRO-3 or FSDP its forward would wait for the other ranks' partitions."""
    tokenizer, texts = make_tokenizer(), make_texts(sentences=2, seed=1)
    module = TinyLM(make_llama(seed=0), tokenizer, texts)
    trainer = type("Trainer", (), {"strategy": type("Zero3", (), {"zero_stage_3": True})()})()
    with pytest.raises(RuntimeError, match=r"under Zero3 \(ZeRO-3 or FSDP\) holds only a partition of each weight"):
        callback(texts).setup(trainer, module, "fit")
    from lightning_moo.strategies import BucketMOOFSDPStrategy

    trainer.strategy = BucketMOOFSDPStrategy()
    with pytest.raises(RuntimeError, match="under BucketMOOFSDPStrategy"):
        callback(texts).setup(trainer, module, "fit")
