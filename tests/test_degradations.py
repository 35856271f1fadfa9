"""Real-ESRGAN degradation maths: kernels vs closed forms, sampling ranges, reproducibility."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline import degradations as dg

# ----------------------------------------------------------------------------- kernels


def test_isotropic_gaussian_matches_closed_form():
    size, sigma = 7, 1.3
    kernel = dg.bivariate_gaussian(size, sigma, sigma, 0.0)
    # hand-written: exp(-(x² + y²) / (2σ²)) / Z on offsets -3..3
    values = {
        (i, j): math.exp(-((i - 3) ** 2 + (j - 3) ** 2) / (2 * sigma**2))
        for i in range(size)
        for j in range(size)
    }
    total = sum(values.values())
    assert kernel.sum() == pytest.approx(1.0, abs=1e-12)
    for i, j in [(3, 3), (0, 0), (1, 5), (6, 2)]:
        assert kernel[i, j] == pytest.approx(values[(i, j)] / total, rel=1e-12)


def test_anisotropic_gaussian_matches_rotated_axes():
    size, sigma_x, sigma_y, theta = 9, 2.5, 0.7, 0.6
    kernel = dg.bivariate_gaussian(size, sigma_x, sigma_y, theta)
    centre = 4

    def unnormalised(row, col):
        x, y = col - centre, row - centre  # x along columns
        u = x * math.cos(theta) + y * math.sin(theta)
        v = -x * math.sin(theta) + y * math.cos(theta)
        return math.exp(-0.5 * (u**2 / sigma_x**2 + v**2 / sigma_y**2))

    total = sum(unnormalised(r, c) for r in range(size) for c in range(size))
    for row, col in [(4, 4), (2, 7), (8, 1), (0, 3)]:
        assert kernel[row, col] == pytest.approx(unnormalised(row, col) / total, rel=1e-10)
    # elongated along the rotated x axis: more mass along direction θ than across it
    along = kernel[centre + round(2 * math.sin(theta)), centre + round(2 * math.cos(theta))]
    across = kernel[centre + round(2 * math.cos(theta)), centre - round(2 * math.sin(theta))]
    assert along > across


@pytest.mark.parametrize("beta", [0.5, 1.0, 2.7])
def test_generalized_and_plateau_closed_forms(beta):
    size, sigma_x, sigma_y, theta = 11, 1.8, 1.1, -0.9
    generalized = dg.bivariate_generalized_gaussian(size, sigma_x, sigma_y, theta, beta)
    plateau = dg.bivariate_plateau(size, sigma_x, sigma_y, theta, beta)
    for kernel in (generalized, plateau):
        assert kernel.sum() == pytest.approx(1.0, abs=1e-12)
    centre = 5
    for row, col in [(5, 7), (2, 9), (10, 0)]:
        x, y = col - centre, row - centre
        u = x * math.cos(theta) + y * math.sin(theta)
        v = -x * math.sin(theta) + y * math.cos(theta)
        distance = u**2 / sigma_x**2 + v**2 / sigma_y**2
        # ratio to the centre (where d² = 0) cancels the normalisation
        assert generalized[row, col] / generalized[centre, centre] == pytest.approx(
            math.exp(-0.5 * distance**beta), rel=1e-10
        )
        assert plateau[row, col] / plateau[centre, centre] == pytest.approx(
            1.0 / (1.0 + distance**beta), rel=1e-10
        )


def test_generalized_gaussian_with_beta_one_is_the_gaussian():
    np.testing.assert_allclose(
        dg.bivariate_generalized_gaussian(13, 2.0, 1.0, 0.4, 1.0),
        dg.bivariate_gaussian(13, 2.0, 1.0, 0.4),
        rtol=1e-12,
    )


@pytest.mark.parametrize("kind", ["iso", "generalized_iso", "plateau_iso"])
def test_isotropic_kernels_are_symmetric(kind):
    params = {
        "k_type": kind,
        "k_size": 15,
        "k_sigma_x": 2.2,
        "k_sigma_y": None,
        "k_rotation": None,
        "k_beta": 1.7,
        "k_omega_c": None,
    }
    kernel = dg.make_kernel(params, "k")
    np.testing.assert_allclose(kernel, kernel.T, atol=1e-15)
    np.testing.assert_allclose(kernel, kernel[::-1, :], atol=1e-15)
    np.testing.assert_allclose(kernel, kernel[:, ::-1], atol=1e-15)
    assert kernel.sum() == pytest.approx(1.0, abs=1e-12)


def test_sinc_kernel_values_and_frequency_response():
    from scipy import special

    cutoff, size = math.pi / 3, 21
    kernel = dg.circular_lowpass_kernel(cutoff, size)
    assert kernel.sum() == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(kernel, kernel.T, atol=1e-15)
    # centre / neighbour = (ω²/4π) / (ω J1(ω·1) / 2π) = ω / (2 J1(ω))
    assert kernel[10, 10] / kernel[10, 11] == pytest.approx(
        cutoff / (2 * special.j1(cutoff)), rel=1e-10
    )
    # r = 5: ω J1(5ω) / (10π), relative to the centre
    expected = (cutoff * special.j1(5 * cutoff) / (10 * math.pi)) / (cutoff**2 / (4 * math.pi))
    assert kernel[10, 15] / kernel[10, 10] == pytest.approx(expected, rel=1e-10)
    # an ideal low-pass at π/3: passes DC, stops the Nyquist frequency
    response = np.abs(np.fft.fft2(kernel, (128, 128)))
    assert response[0, 0] == pytest.approx(1.0)
    assert response[64, 64] < 0.1 and response[0, 64] < 0.1
    padded = dg.circular_lowpass_kernel(cutoff, 7, pad_to=21)
    assert padded.shape == (21, 21) and padded[7:14, 7:14] == pytest.approx(
        dg.circular_lowpass_kernel(cutoff, 7)
    )
    assert padded[:7].sum() == 0.0


# ----------------------------------------------------------------------------- sampling


def test_defaults_are_the_osediff_numbers():
    config = dg.degradation_config()
    assert config["kernel_prob"] == [0.45, 0.25, 0.12, 0.03, 0.12, 0.03]
    assert (config["blur_sigma"], config["blur_sigma2"]) == ([0.2, 3.0], [0.2, 1.5])
    assert (config["resize_prob"], config["resize_prob2"]) == ([0.2, 0.7, 0.1], [0.3, 0.4, 0.3])
    assert (config["resize_range"], config["resize_range2"]) == ([0.15, 1.5], [0.3, 1.2])
    assert (config["noise_range"], config["noise_range2"]) == ([1.0, 30.0], [1.0, 25.0])
    assert (config["second_blur_prob"], config["final_sinc_prob"], config["scale"]) == (0.8, 0.8, 4)


def test_drawn_parameters_stay_in_their_ranges():
    config = dg.degradation_config()
    counts = {kind: 0 for kind in (*dg.KERNEL_TYPES, "sinc")}
    for seed in range(300):
        params = dg.sample_degradation_params(np.random.default_rng(seed), config)
        json.dumps(params)  # flat and JSON-able
        for prefix, suffix in (("kernel1", ""), ("kernel2", "2")):
            kind = params[f"{prefix}_type"]
            if kind is None:
                assert prefix == "kernel2" and not params["blur2_applied"]
                assert all(params[f"kernel2_{field}"] is None for field in dg.KERNEL_FIELDS)
                continue
            counts[kind] += prefix == "kernel1"
            size = params[f"{prefix}_size"]
            assert size in range(7, 22, 2)
            if kind == "sinc":
                low = math.pi / 3 if size < 13 else math.pi / 5
                assert low <= params[f"{prefix}_omega_c"] <= math.pi
                assert params[f"{prefix}_sigma_x"] is None
                continue
            assert params[f"{prefix}_omega_c"] is None
            sigma_low, sigma_high = config[f"blur_sigma{suffix}"]
            assert sigma_low <= params[f"{prefix}_sigma_x"] <= sigma_high
            if kind.endswith("iso") and not kind.endswith("aniso"):
                assert params[f"{prefix}_sigma_y"] is None and params[f"{prefix}_rotation"] is None
            else:
                assert sigma_low <= params[f"{prefix}_sigma_y"] <= sigma_high
                assert -math.pi <= params[f"{prefix}_rotation"] <= math.pi
            beta = params[f"{prefix}_beta"]
            if kind.startswith("generalized"):
                assert 0.5 <= beta <= 4.0
            elif kind.startswith("plateau"):
                assert 1.0 <= beta <= 2.0
            else:
                assert beta is None
        for prefix, low, high in (("resize1", 0.15, 1.5), ("resize2", 0.3, 1.2)):
            direction, scale = params[f"{prefix}_direction"], params[f"{prefix}_scale"]
            assert {"up": 1.0 <= scale <= high, "down": low <= scale <= 1.0, "keep": scale == 1.0}[
                direction
            ]
            assert params[f"{prefix}_mode"] in dg.RESIZE_MODES
        for prefix, sigma_high, poisson_high in (("noise1", 30, 3.0), ("noise2", 25, 2.5)):
            if params[f"{prefix}_type"] == "gaussian":
                assert 1 <= params[f"{prefix}_sigma"] <= sigma_high
                assert params[f"{prefix}_poisson_scale"] is None
            else:
                assert 0.05 <= params[f"{prefix}_poisson_scale"] <= poisson_high
                assert params[f"{prefix}_sigma"] is None
            assert 0 <= params[f"{prefix}_seed"] < 2**63
        assert 30 <= params["jpeg1_quality"] <= 95 and 30 <= params["jpeg2_quality"] <= 95
        assert params["final_order"] in dg.FINAL_ORDERS
        if params["final_sinc_applied"]:
            assert params["final_sinc_size"] in range(7, 22, 2)
            assert math.pi / 3 <= params["final_sinc_omega_c"] <= math.pi
        else:
            assert params["final_sinc_size"] is None and params["final_sinc_omega_c"] is None
        assert params["resize_back"] is True and params["resize_back_mode"] in dg.RESIZE_MODES
    # kernel1 type frequencies follow 0.9 × kernel_prob and sinc_prob 0.1 (loose bounds, n = 300)
    assert 0.30 < counts["iso"] / 300 < 0.52
    assert 0.14 < counts["aniso"] / 300 < 0.32
    assert 0.03 < counts["sinc"] / 300 < 0.18


def test_configured_ranges_are_respected_and_unknown_keys_refused():
    config = {
        "blur_sigma": [0.5, 0.6],
        "jpeg_range": [70, 72],
        "resize_prob": [0, 1, 0],
        "sinc_prob": 0.0,
    }
    for seed in range(50):
        params = dg.sample_degradation_params(np.random.default_rng(seed), config)
        assert 70 <= params["jpeg1_quality"] <= 72
        assert params["resize1_direction"] == "down"
        assert 0.5 <= params["kernel1_sigma_x"] <= 0.6
    with pytest.raises(KeyError, match="blur_sigmaa"):
        dg.degradation_config({"blur_sigmaa": [1, 2]})
    with pytest.raises(ValueError, match="kernel_prob"):
        dg.degradation_config({"kernel_prob": [0.5, 0.5]})
    with pytest.raises(ValueError, match="noise_range"):
        dg.degradation_config({"noise_range": [30, 1]})


# ----------------------------------------------------------------------------- operations


def test_filter2d_identity_and_tiny_images():
    image = np.random.default_rng(0).random((5, 6, 3), dtype=np.float32)
    delta = np.zeros((21, 21))
    delta[10, 10] = 1.0
    np.testing.assert_array_equal(dg.filter2d(image, delta), image)  # 21-tap kernel on 5 px
    constant = np.full((9, 9, 3), 0.25, dtype=np.float32)
    blurred = dg.filter2d(constant, dg.bivariate_gaussian(21, 3.0, 3.0, 0.0))
    np.testing.assert_allclose(blurred, 0.25, atol=1e-6)


def test_noise_statistics_and_gray_noise():
    image = np.full((64, 64, 3), 0.5, dtype=np.float32)
    noisy = dg.gaussian_noise(image, sigma=10.0, gray=False, seed=1)
    assert np.std(noisy - image) == pytest.approx(10 / 255, rel=0.05)
    gray = dg.gaussian_noise(image, sigma=10.0, gray=True, seed=1)
    np.testing.assert_array_equal(gray[..., 0], gray[..., 2])
    assert not np.array_equal(noisy[..., 0], noisy[..., 2])
    # 140 grey levels → v = 2^⌈log₂ 140⌉ = 256: noise Poisson(256x)/256 − x, variance x/256
    levels = np.random.default_rng(2).integers(60, 200, (64, 64, 3)) / 255.0
    levels = levels.astype(np.float32)
    shot = dg.poisson_noise(levels, scale=1.0, gray=False, seed=2) - levels
    assert np.mean(shot) == pytest.approx(0.0, abs=2e-3)
    assert np.var(shot) == pytest.approx(np.mean(levels) / 256, rel=0.05)
    scaled = dg.poisson_noise(levels, scale=2.0, gray=False, seed=2) - levels
    inside = (levels + 2 * shot > 0) & (levels + 2 * shot < 1)  # not clipped
    assert inside.mean() > 0.95
    np.testing.assert_allclose(scaled[inside], 2 * shot[inside], atol=1e-6)


def test_jpeg_is_real_lossy_encoding():
    rng = np.random.default_rng(3)
    image = dg.filter2d(
        rng.random((32, 32, 3), dtype=np.float32), dg.bivariate_gaussian(5, 1, 1, 0)
    )
    error_high = np.abs(dg.jpeg_compress(image, 95) - image).mean()
    error_low = np.abs(dg.jpeg_compress(image, 30) - image).mean()
    assert 0 < error_high < error_low


# ----------------------------------------------------------------------------- the chain


def _hq(size=48):
    rng = np.random.default_rng(7)
    image = rng.random((size, size, 3), dtype=np.float32)
    return dg.filter2d(image, dg.bivariate_gaussian(7, 1.5, 1.5, 0.0))


def test_degradation_is_reproducible_from_params_byte_for_byte():
    hq = _hq()
    previous = torch.get_num_threads()
    for seed in range(6):
        params = dg.sample_degradation_params(np.random.default_rng(seed))
        first = dg.apply_degradation(hq, json.loads(json.dumps(params)))
        torch.set_num_threads(2)
        try:
            second = dg.apply_degradation(hq.copy(), params)
        finally:
            torch.set_num_threads(previous)
        assert first.tobytes() == second.tobytes()
        assert first.shape == hq.shape and first.dtype == np.float32
        # quantised onto the 8-bit grid
        np.testing.assert_allclose(first * 255, np.rint(first * 255), atol=1e-4)
        other_noise = dict(params, noise2_seed=params["noise2_seed"] + 1)
        assert not np.array_equal(dg.apply_degradation(hq, other_noise), first)


def test_parameters_read_back_from_parquet_replay_byte_for_byte(tmp_path):
    hq = _hq()
    drawn = [dg.sample_degradation_params(np.random.default_rng(seed)) for seed in range(12)]
    assert {params["final_sinc_applied"] for params in drawn} == {True, False}
    pd.DataFrame(drawn).to_parquet(tmp_path / "params.parquet")
    rows = pd.read_parquet(tmp_path / "params.parquet").to_dict("records")
    # pandas brings an int column with missing values back as floats with NaN
    assert any(isinstance(row["final_sinc_size"], float) for row in rows)
    for params, row in zip(drawn, rows, strict=True):
        replayed = dg.recorded_params(row)
        assert replayed == params
        assert type(replayed["final_sinc_size"]) is type(params["final_sinc_size"])
        expected = dg.apply_degradation(hq, params)
        assert dg.apply_degradation(hq, replayed).tobytes() == expected.tobytes()
    with pytest.raises(ValueError, match="jpeg1_quality"):
        dg.recorded_params({"jpeg1_quality": 30.5})


def test_output_size_with_and_without_resize_back():
    hq = _hq(48)
    config = {"resize_back": False}
    params = dg.sample_degradation_params(np.random.default_rng(0), config)
    assert params["resize_back_mode"] is None
    assert dg.apply_degradation(hq, params, config).shape == (12, 12, 3)


def test_final_order_changes_the_result():
    hq = _hq()
    params = dg.sample_degradation_params(np.random.default_rng(1))
    swapped = dict(
        params, final_order=[o for o in dg.FINAL_ORDERS if o != params["final_order"]][0]
    )
    assert not np.array_equal(dg.apply_degradation(hq, params), dg.apply_degradation(hq, swapped))
    with pytest.raises(ValueError, match="final_order"):
        dg.apply_degradation(hq, dict(params, final_order="sideways"))
