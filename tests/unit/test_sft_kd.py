"""The white-box KD settings reach the divergence they parametrise."""

import pytest

from pbkd_cli.config.schema import Divergence, KDConfig
from pbkd_cli.stages.sft import divergence_parameters


@pytest.mark.parametrize("loss, expected", [
    (Divergence.jsd, {"beta": 0.3}),
    (Divergence.skl, {"alpha": 0.2}),
    (Divergence.srkl, {"alpha": 0.2}),
    (Divergence.fkl, {}),
    (Divergence.rkl, {}),
    (Divergence.tvd, {}),
])
def test_each_divergence_gets_its_own_parameter(loss, expected):
    assert divergence_parameters(KDConfig(loss=loss, jsd_beta=0.3, skew_alpha=0.2)) == expected
