//! The chat template of tokenizer_config.json, rendered with minijinja as transformers renders
//! it. Gemma 1 has no system role: a system message is folded into the first user turn.

use std::path::Path;

use minijinja::{context, Environment, Error, ErrorKind};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error("{path}: {reason}")]
    Config { path: String, reason: String },
    #[error("this model has no chat template (tokenizer_config.json has no chat_template)")]
    NoTemplate,
    #[error("messages: {0}")]
    Messages(String),
    #[error("chat template: {0}")]
    Render(String),
}

pub struct ChatTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
}

impl ChatTemplate {
    /// Reads `chat_template` (a string, or a list of named templates: "default" is used) from
    /// tokenizer_config.json. None when the file or the template is absent.
    pub fn from_dir(dir: &Path) -> Result<Option<Self>, ChatError> {
        let path = dir.join("tokenizer_config.json");
        let Ok(text) = std::fs::read_to_string(&path) else {
            return Ok(None);
        };
        let bad = |reason: String| ChatError::Config {
            path: path.display().to_string(),
            reason,
        };
        let cfg: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let source = match cfg.get("chat_template") {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template")?.as_str())
                .map(str::to_string)
                .ok_or_else(|| bad("chat_template list has no \"default\" template".into()))?,
            _ => return Ok(None),
        };
        let token = |key: &str, default: &str| {
            cfg.get(key)
                .and_then(|v| v.as_str().or_else(|| v.get("content")?.as_str()))
                .unwrap_or(default)
                .to_string()
        };
        let mut env = Environment::new();
        env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned("chat", source)
            .map_err(|e| bad(format!("chat_template does not compile: {e}")))?;
        Ok(Some(Self {
            env,
            bos: token("bos_token", "<bos>"),
            eos: token("eos_token", "<eos>"),
        }))
    }

    /// Renders the conversation, ending with the model's turn opened.
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String, ChatError> {
        let messages = fold_system(messages)?;
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| ChatError::Render(e.to_string()))?;
        tmpl.render(context! {
            messages => messages,
            bos_token => self.bos,
            eos_token => self.eos,
            add_generation_prompt => true,
        })
        .map_err(|e| ChatError::Render(e.to_string()))
    }
}

/// Gemma 1 has no system role: the system text leads the first user turn instead of failing.
fn fold_system(messages: &[ChatMessage]) -> Result<Vec<ChatMessage>, ChatError> {
    let mut system = Vec::new();
    let mut rest = Vec::new();
    for m in messages {
        match m.role.as_str() {
            "system" | "developer" if rest.is_empty() => system.push(m.content.clone()),
            "system" | "developer" => {
                return Err(ChatError::Messages(
                    "a system message may only come first".into(),
                ))
            }
            "user" | "assistant" => rest.push(m.clone()),
            other => {
                return Err(ChatError::Messages(format!(
                    "role {other:?} is not supported; use system, user or assistant"
                )))
            }
        }
    }
    if rest.is_empty() {
        return Err(ChatError::Messages("no user message".into()));
    }
    if !system.is_empty() {
        if rest[0].role != "user" {
            return Err(ChatError::Messages(
                "the first turn after system must be user".into(),
            ));
        }
        rest[0].content = format!("{}\n\n{}", system.join("\n\n"), rest[0].content);
    }
    Ok(rest)
}
