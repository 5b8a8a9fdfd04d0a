"""vggnet: the VGG networks of Simonyan & Zisserman (ICLR 2015) in PyTorch.

    >>> import vggnet
    >>> model = vggnet.vgg("D", batch_norm=True)      # = torchvision's vgg16_bn, layer for layer
    >>> dense = model.to_fully_conv()                 # section 3.2's fully-convolutional form
"""

from .configs import CONFIGS, MODELS
from .model import (
    VGG, VGGFullyConv, WarmStartReport, get_model, list_models, vgg, vgg11, vgg11_bn, vgg11_lrn, vgg11_lrn_bn,
    vgg13, vgg13_bn, vgg16, vgg16_bn, vgg16c, vgg16c_bn, vgg19, vgg19_bn, warm_start,
)
from .nets import Net, load_net, net_from_model
from . import losses
from .features import FeatureExtractor
from .weights import read_weights

__version__ = "0.1.0"


def __getattr__(name: str):
    # `vggnet.pretrained` lives with the trainer; import it only when asked for, so `import vggnet` stays light.
    if name == "pretrained":
        from .train import pretrained

        return pretrained
    raise AttributeError(f"module 'vggnet' has no attribute {name!r}")

__all__ = [
    "CONFIGS", "MODELS", "VGG", "VGGFullyConv", "WarmStartReport", "Net", "FeatureExtractor", "losses",
    "read_weights", "pretrained", "get_model", "list_models",
    "load_net", "net_from_model", "vgg", "vgg11", "vgg11_bn", "vgg11_lrn", "vgg11_lrn_bn", "vgg13", "vgg13_bn",
    "vgg16", "vgg16_bn", "vgg16c", "vgg16c_bn", "vgg19", "vgg19_bn", "warm_start",
]
