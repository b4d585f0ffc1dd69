//! Chat prompts: the model's own Jinja chat template, rendered with minijinja.

use serde::Serialize;

use crate::error::{EngineError, Result};

/// One chat message.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

impl Message {
    /// A message with `role` and `content`.
    pub fn new(role: &str, content: &str) -> Self {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A compiled chat template.
#[derive(Debug)]
pub struct ChatTemplate {
    source: String,
    bos: String,
    eos: String,
}

impl ChatTemplate {
    /// A template from its Jinja source (`tokenizer.chat_template`) and the
    /// BOS/EOS token texts the template may reference.
    pub fn new(source: &str, bos: &str, eos: &str) -> Result<Self> {
        let t = ChatTemplate {
            source: source.into(),
            bos: bos.into(),
            eos: eos.into(),
        };
        // Compile once to report syntax errors early.
        t.env()?;
        Ok(t)
    }

    fn env(&self) -> Result<minijinja::Environment<'_>> {
        let mut env = minijinja::Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template("chat", &self.source).map_err(|e| {
            EngineError::InvalidInput(format!("chat template does not compile: {e}"))
        })?;
        Ok(env)
    }

    /// Renders `messages`, ending with the assistant prefix when `add_generation_prompt`.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let env = self.env()?;
        let tmpl = env
            .get_template("chat")
            .map_err(|e| EngineError::InvalidInput(e.to_string()))?;
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos,
            eos_token => self.eos,
        })
        .map_err(|e| EngineError::InvalidInput(format!("chat template failed: {e}")))
    }
}

#[cfg(test)]
mod tests;
