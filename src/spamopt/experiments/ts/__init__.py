"""Time-series forecasting with injected anomalies: PatchTST under SPAM, Stable-SPAM and Adam."""
