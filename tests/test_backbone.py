"""ResNet trunk: torchvision-compatible weights from a local file, clear errors, freezing, slimmable widths."""
import os

import pytest
import torch
import torchvision

from msad.backbone import ResNetTrunk, load_imagenet_weights


def test_torchvision_resnet_state_dict_loads_key_for_key(tmp_path):
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)  # includes fc.*, which the trunk ignores
    trunk = ResNetTrunk(18, norm="frozen_bn")
    load_imagenet_weights(trunk, str(path))
    assert torch.equal(trunk.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)
    assert torch.equal(trunk.bn1.running_var, reference.bn1.running_var)
    reference.eval()
    x = torch.randn(1, 3, 64, 64)
    trunk_c5 = trunk(x)[-1]
    ref = reference.layer4(reference.layer3(reference.layer2(reference.layer1(
        reference.maxpool(reference.relu(reference.bn1(reference.conv1(x))))))))
    torch.testing.assert_close(trunk_c5, ref)


def test_wrong_weights_are_one_error_naming_the_keys(tmp_path):
    path = tmp_path / "resnet34.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), path)
    with pytest.raises(ValueError, match=r"does not fit this backbone \(unexpected: layer1\.2") as err:
        load_imagenet_weights(ResNetTrunk(18), str(path))
    assert str(path) in str(err.value)
    with pytest.raises(ValueError, match="shape mismatch"):
        load_imagenet_weights(ResNetTrunk(18, width=0.5), str(path))


def test_missing_file_and_code_carrying_pickle_are_refused(tmp_path):
    with pytest.raises(ValueError, match="file not found"):
        load_imagenet_weights(ResNetTrunk(18), str(tmp_path / "nope.pth"))

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))
    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": Evil()}, path)
    with pytest.raises(ValueError, match="not a loadable state_dict"):
        load_imagenet_weights(ResNetTrunk(18), str(path))
    assert not (tmp_path / "pwned").exists()


def test_freeze_at_two_freezes_stem_and_res2_only():
    trunk = ResNetTrunk(18, norm="bn", freeze_at=2)
    frozen = {n.split(".")[0] for n, p in trunk.named_parameters() if not p.requires_grad}
    assert frozen == {"conv1", "bn1", "layer1"}
    assert all(p.requires_grad for p in trunk.layer2.parameters())


def test_width_multiplier_scales_every_stage():
    assert ResNetTrunk(50).out_channels == [256, 512, 1024, 2048]
    assert ResNetTrunk(18, width=0.25, norm="gn").out_channels == [16, 32, 64, 128]
