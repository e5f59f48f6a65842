"""PatchCore: the coreset, the search and the reweighting against hand-made
values, and a model fitted on the toy set finds its defects with no training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import assert_finds_toy_defects, fit_toy

from anomap.methods import build_model
from anomap.methods.patchcore import MAX_CANDIDATES, gaussian_blur, greedy_coreset
from anomap.runfolder import RunConfig, load_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_coreset_takes_the_farthest_point_each_time() -> None:
    points = torch.tensor([[0.0, 0.0], [0.1, 0.0], [10.0, 0.0], [5.0, 0.0], [0.0, 7.0]])
    chosen = greedy_coreset(points, 3, seed=0).tolist()
    # whatever the start, the next two are the points farthest from those chosen
    first = chosen[0]
    distances = ((points - points[first]) ** 2).sum(1)
    assert chosen[1] == int(distances.argmax())
    assert len(set(chosen)) == 3 and greedy_coreset(points, 9).tolist() == [0, 1, 2, 3, 4]


def test_blur_keeps_a_constant_map_and_spreads_a_peak() -> None:
    flat = torch.full((1, 32, 32), 2.0)
    torch.testing.assert_close(gaussian_blur(flat, 4.0), flat)
    peak = torch.zeros(1, 32, 32)
    peak[0, 16, 16] = 1.0
    blurred = gaussian_blur(peak, 2.0)
    assert blurred.sum() == pytest.approx(1.0, abs=1e-4) and blurred.argmax() == 16 * 32 + 16


def test_search_in_faiss_and_in_matrix_products_agree() -> None:
    pytest.importorskip("faiss")
    model = build_model("patchcore", weights="random", bank_size=8)
    bank, queries = torch.randn(50, 6), torch.randn(20, 6)
    with_faiss = model._search(queries, bank, 3)
    queries.requires_grad_(True)  # takes the matrix-product path, as an export does
    by_products = model._search(queries, bank, 3)
    torch.testing.assert_close(with_faiss[0], by_products[0].detach(), atol=1e-4, rtol=1e-4)
    assert torch.equal(with_faiss[1], by_products[1])


def test_reweighting_is_the_papers_softmax() -> None:
    model = build_model("patchcore", weights="random")
    model.bank = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    model.bank_neighbours = torch.tensor([[1, 2], [0, 2], [0, 1]])
    queries = torch.tensor([[[0.0, 0.0], [0.5, 0.0]]])  # one image, two patches
    distances = torch.tensor([[0.0, 0.5]])
    nearest = torch.tensor([[0, 0]])
    weight = model._weights(queries, distances, nearest)
    # worst patch (0.5, 0); its nearest bank row 0 and that row's neighbours 1, 2
    spread = torch.tensor([0.5, 0.5, (0.25 + 4.0) ** 0.5])
    expected = 1 - torch.exp(spread[0]) / torch.exp(spread).sum()
    torch.testing.assert_close(weight, expected[None])


@pytest.fixture(scope="module")
def patchcore_run(toy_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fit_toy("patchcore", toy_data, tmp_path_factory.mktemp("runs") / "patchcore",
                   epochs=1, image_size=64)


def test_patchcore_finds_the_toy_defects_without_training(patchcore_run: Path) -> None:
    # measured at 64 px: image 1.0, pixel 0.95, AUPRO 0.90 (128 px: 1.0 / 0.97 / 0.92)
    assert_finds_toy_defects(patchcore_run, image=0.9, pixel=0.85, aupro=0.8)
    model, config = load_model(patchcore_run, "cpu")
    assert 0 < len(model.bank) <= config.model["bank_size"]
    assert len(model.bank) <= MAX_CANDIDATES
    again = build_model("patchcore", **{**RunConfig.load(patchcore_run).model, "weights": None})
    again.load_state_dict(model.state_dict())
    images = torch.rand(2, 3, 64, 64)
    assert torch.equal(model.anomaly_map(images), again.eval().anomaly_map(images))
