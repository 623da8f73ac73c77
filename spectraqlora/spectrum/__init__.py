"""Spectrum: the SNR scan of a checkpoint's weight matrices (streamed, cached) and the selection
strategies that turn its table into module names. Imports store/ and the top level."""
