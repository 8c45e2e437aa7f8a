"""The site: Flower ClientApp, local DP-SGD training and evaluation, data loading."""
