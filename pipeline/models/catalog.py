"""The valid model choices, in one place and free of torch (params validation and
`seg models --help` read them without importing the networks)."""

ARCHS = ("deeplabv3", "deeplabv3plus")
BACKBONES = ("resnet50", "resnet101", "mobilenet_v3_large", "xception65")
OUTPUT_STRIDES = (8, 16, 32)
