"""Reinforcement learning: stable-baselines3's PPO on gymnasium's MuJoCo tasks, under SPAM and Adam."""
