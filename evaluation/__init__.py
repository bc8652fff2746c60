"""The paper's scorers and reports: CLIP/aesthetic/ImageReward/PickScore/HPS metrics, FID, DPG-Bench, the toy world's Table 4 and its study, plots."""
