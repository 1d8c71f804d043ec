"""Screens: the chat, and the modals it opens (help, model info, system prompt, save)."""

from rtlocal.tui.screens.chat import ChatScreen
from rtlocal.tui.screens.help import HelpScreen
from rtlocal.tui.screens.model_info import ModelInfoScreen
from rtlocal.tui.screens.save import SaveScreen
from rtlocal.tui.screens.system_prompt import SystemPromptScreen

__all__ = ["ChatScreen", "HelpScreen", "ModelInfoScreen", "SaveScreen", "SystemPromptScreen"]
