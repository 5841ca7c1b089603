"""Published numbers of the reproduced paper (../shared/seed/000_3bd72877ca8a5203.txt), for side-by-side reports.

Table 1: SSIM of gradient inversion on ResNet-18, mean and std over 10 images.
Table 2: membership-inference attack accuracy (%) for prediction, loss and
cross-entropy attacks. Keys use this project's compressor specs.
"""

TABLE1 = {  # dataset -> spec -> (mean, std)
    "cifar10": {
        "none": (0.3451, 0.2230),
        "powersgd:1": (0.0040, 0.0028),
        "topk_level:1": (0.0071, 0.0051),
        "powersgd:2": (0.0137, 0.0079),
        "topk_level:2": (0.0069, 0.0053),
        "powersgd:4": (0.0361, 0.0306),
        "topk_level:4": (0.0065, 0.0051),
        "powersgd:30": (0.1101, 0.0758),
        "topk_level:30": (0.0178, 0.0151),
        "powersgd:50": (0.1339, 0.0542),
        "topk_level:50": (0.0262, 0.0169),
    },
    "cifar100": {
        "none": (0.5576, 0.0796),
        "powersgd:1": (0.0069, 0.0056),
        "topk_level:1": (0.0069, 0.0056),
        "powersgd:2": (0.0112, 0.0093),
        "topk_level:2": (0.0069, 0.0049),
        "powersgd:4": (0.0231, 0.0182),
        "topk_level:4": (0.0085, 0.0059),
        "powersgd:30": (0.0437, 0.0306),
        "topk_level:30": (0.0385, 0.0306),
        "powersgd:50": (0.0482, 0.0327),
        "topk_level:50": (0.0758, 0.0401),
    },
    "mnist": {
        "none": (0.8685, 0.1198),
        "powersgd:1": (0.0708, 0.0736),
        "topk_level:1": (0.0035, 0.0024),
        "powersgd:2": (0.0946, 0.0659),
        "topk_level:2": (0.0072, 0.0050),
        "powersgd:4": (0.2361, 0.1519),
        "topk_level:4": (0.0156, 0.0078),
        "powersgd:30": (0.4909, 0.2228),
        "topk_level:30": (0.1706, 0.1761),
        "powersgd:50": (0.6132, 0.1155),
        "topk_level:50": (0.1715, 0.1183),
    },
}

TABLE2 = {  # dataset -> spec -> (prediction, loss, cross-entropy) accuracy in %
    "cifar10": {
        "none": (54.02, 55.17, 55.93),
        "powersgd:1": (54.10, 55.15, 56.05),
        "topk_level:1": (54.93, 54.87, 53.03),
        "powersgd:2": (53.98, 54.92, 56.47),
        "topk_level:2": (56.20, 56.30, 54.97),
        "powersgd:4": (54.02, 55.07, 55.88),
        "topk_level:4": (56.52, 57.20, 56.53),
        "powersgd:30": (54.23, 55.08, 56.03),
        "topk_level:30": (54.15, 55.08, 56.00),
        "powersgd:50": (53.83, 54.80, 55.53),
        "topk_level:50": (54.13, 55.12, 55.77),
    },
    "cifar100": {
        "none": (66.78, 69.83, 72.57),
        "powersgd:1": (67.27, 70.23, 71.52),
        "topk_level:1": (56.25, 55.73, 51.68),
        "powersgd:2": (66.70, 70.08, 71.73),
        "topk_level:2": (57.35, 56.90, 52.47),
        "powersgd:4": (66.82, 70.17, 72.50),
        "topk_level:4": (63.47, 63.03, 56.18),
        "powersgd:30": (67.27, 70.17, 72.47),
        "topk_level:30": (67.82, 69.85, 69.45),
        "powersgd:50": (67.35, 70.27, 72.67),
        "topk_level:50": (67.20, 69.47, 70.25),
    },
    "mnist": {
        "none": (51.00, 51.30, 51.48),
        "powersgd:1": (51.18, 51.57, 51.80),
        "topk_level:1": (51.17, 51.60, 51.77),
        "powersgd:2": (51.22, 51.62, 51.85),
        "topk_level:2": (51.22, 51.77, 51.83),
        "powersgd:4": (51.05, 51.48, 51.80),
        "topk_level:4": (51.08, 51.53, 51.73),
        "powersgd:30": (51.08, 51.48, 51.68),
        "topk_level:30": (51.03, 51.38, 52.02),
        "powersgd:50": (50.98, 51.40, 51.62),
        "topk_level:50": (50.97, 51.35, 51.53),
    },
}
