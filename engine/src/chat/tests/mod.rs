//! Unit tests of the parent module.

use super::*;

const SMOL: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

#[test]
fn chatml_multi_turn_with_default_system() {
    let t = ChatTemplate::new(SMOL, "<|im_start|>", "<|im_end|>").unwrap();
    let out = t
        .render(
            &[
                Message::new("user", "Hi"),
                Message::new("assistant", "Hello!"),
                Message::new("user", "2+2?"),
            ],
            true,
        )
        .unwrap();
    assert_eq!(
        out,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    );
    let sys = t
        .render(
            &[
                Message::new("system", "Be brief."),
                Message::new("user", "Hi"),
            ],
            false,
        )
        .unwrap();
    assert_eq!(
        sys,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    );
}

#[test]
fn python_string_methods_and_raise_exception_work() {
    let t = ChatTemplate::new("{{ messages[0]['content'].strip() }}{% if messages|length > 1 %}{{ raise_exception('only one') }}{% endif %}", "", "").unwrap();
    assert_eq!(
        t.render(&[Message::new("user", "  x  ")], false).unwrap(),
        "x"
    );
    let err = t
        .render(
            &[Message::new("user", "a"), Message::new("user", "b")],
            false,
        )
        .unwrap_err();
    assert!(err.to_string().contains("only one"));
}
