"""Question wording for the synthetic world, split into TRAIN and HELD-OUT paraphrase pools.

Design: every pool maps "train" / "heldout" to disjoint template lists (a test checks that no template,
after normalisation, is in both), so eval on "heldout" measures unseen wording, not memorised strings.
Templates use American spelling; `synthetic._vary` turns them British at random. `{obj}` is a noun phrase
for one object ("the star", "the red one", "the shape at the top left").
"""
from __future__ import annotations


def _p(train: list[str], heldout: list[str]) -> dict[str, list[str]]:
    return {"train": train, "heldout": heldout}


_MOVE_ANY = _p(["What is the shape doing?", "What happens to the shape?", "Describe the motion of the shape."],
               ["What does the shape do in this clip?", "Tell me what the shape does."])

TEMPLATES: dict[str, dict[str, list[str]]] = {
    "color": _p(["What color is {obj}?", "Which color is {obj}?", "Tell me the color of {obj}.",
                 "What is the color of {obj}?", "Name the color of {obj}."],
                ["Can you tell me what color {obj} is?", "Identify the color of {obj}.",
                 "What color has {obj} got?"]),
    "shape": _p(["What shape is {obj}?", "Which shape is {obj}?", "What kind of shape is {obj}?",
                 "Name the shape of {obj}.", "What is {obj}?"],
                ["Can you tell me what shape {obj} is?", "Identify the shape of {obj}.",
                 "What form does {obj} have?"]),
    "position": _p(["Where is {obj}?", "Where is {obj} in the picture?", "In which part of the image is {obj}?",
                    "What is the position of {obj}?"],
                   ["Whereabouts is {obj}?", "Tell me where {obj} is located.",
                    "Which part of the picture contains {obj}?"]),
    "count": _p(["How many shapes are there?", "How many shapes do you see?", "Count the shapes.",
                 "How many objects are in the image?", "What is the number of shapes in the picture?"],
                ["How many shapes can you spot?", "Tell me how many shapes the picture contains.",
                 "What's the total number of objects here?"]),
    "number": _p(["What number is written?", "What number is shown in the image?", "Read the number.",
                  "Which number do you see?"],
                 ["What number does the picture show?", "Can you read the number in this image?",
                  "Tell me the number written here."]),
    "text": _p(["What word is written?", "Read the word in the image.", "What does the text say?",
                "Which word is shown?"],
               ["What word can you read in the picture?", "Tell me the word that is written.",
                "What is written in this image?"]),
    "beep_count": _p(["How many beeps are there?", "How many beeps do you hear?", "Count the beeps.",
                      "How many times does it beep?"],
                     ["What is the number of beeps in this audio?", "Tell me how many beeps you can hear.",
                      "How many tones are played?"]),
    "pitch": _p(["Are the beeps high or low?", "Is the tone high or low pitched?",
                 "Is the pitch of the beeps high or low?", "High or low beeps?"],
                ["Would you say the beeps are high or low?", "Do you hear high or low tones?",
                 "What is the pitch of the sound, high or low?"]),
    "spoken_word": _p(["What word is said?", "What word do you hear?", "Which word is spoken?",
                       "What does the speaker say?", "Transcribe the word."],
                      ["What word is spoken in this recording?", "Tell me the word you heard.",
                       "What did the voice say?"]),
    "video_move": _p(_MOVE_ANY["train"] + ["Which way is the shape moving?",
                                           "In which direction does the shape move?"],
                     _MOVE_ANY["heldout"] + ["Where is the shape heading?"]),
    "video_size": _p(_MOVE_ANY["train"] + ["Is the shape growing or shrinking?",
                                           "How does the size of the shape change?"],
                     _MOVE_ANY["heldout"] + ["Does the shape get bigger or smaller over time?"]),
    "video_beeps": _p(["How many beeps are in the video?", "How many beeps do you hear in this video?",
                       "Count the beeps in the clip."],
                      ["How many times does the video beep?", "What is the number of beeps in this clip?"]),
    "followup_color": _p(["And what color is it?", "What color is it?", "And its color?"],
                         ["Which color does it have?", "And what color would that be?"]),
    "followup_shape": _p(["And what shape is it?", "What shape is it?", "And its shape?"],
                         ["Which shape does it have?", "And what shape would that be?"]),
    "followup_position": _p(["And where is it?", "Where is it?", "And its position?"],
                            ["And where can I find it?", "Which part of the picture is it in?"]),
    "caption_image": _p(["Describe the image.", "What do you see?", "Describe the picture.",
                         "Give a caption for this image."],
                        ["Write a short caption.", "What is in this picture?"]),
    "caption_video": _p(["Describe the video.", "What happens in the video?", "Give a caption for this clip."],
                        ["Write a short caption for this video.", "What is going on in this clip?"]),
    "transcript": _p(["Transcribe the audio.", "What do you hear?", "Describe the sound."],
                     ["Write down what you hear.", "What is in this recording?"]),
}

CAPABILITIES = ("I can look at pictures of simple shapes and tell you their color, shape, position and how "
                "many there are, read numbers and short words, listen to beeps and spoken words, and watch "
                "simple videos of moving shapes.")
REFUSAL = ("I can only answer questions about simple shapes, numbers and words in pictures, beeps and "
           "spoken words in audio, and simple videos of moving shapes.")

# intent -> (prompt pools, fixed answer)
CHITCHAT: dict[str, tuple[dict[str, list[str]], str]] = {
    "greeting": (_p(["hi", "hello", "hey", "good morning"], ["hi there", "hello, how are you?", "good evening"]),
                 "Hello! " + CAPABILITIES),
    "capabilities": (_p(["What can you do?", "help", "What do you do?", "What are you able to do?"],
                        ["What are your abilities?", "How can you help me?", "What kinds of things can you do?"]),
                     CAPABILITIES),
    "identity": (_p(["Who are you?", "What is your name?"], ["What are you?", "Tell me about yourself."]),
                 "I am a small assistant. " + CAPABILITIES),
    "thanks": (_p(["thanks", "thank you"], ["thanks a lot", "cheers, thank you!"]), "You're welcome!"),
}

REFUSAL_PROMPTS: dict[str, dict[str, list[str]]] = {
    "text": _p(["What is the capital of France?", "Write me a poem.", "Who won the world cup?", "Tell me a joke.",
                "Translate hello into Spanish.", "What is the stock price of Apple?"],
               ["Who wrote Hamlet?", "What's the weather like tomorrow?", "Write a short story about a dragon.",
                "How do I cook pasta?"]),
    "image": _p(["What breed is this dog?", "Whose face is this?", "What brand is this car?",
                 "What city is this photo from?"],
                ["What kind of bird is this?", "Which painter made this?", "What food is on the plate?"]),
    "audio": _p(["Who is the singer?", "What song is this?", "What instrument is playing?"],
                ["Which band recorded this?", "What music genre is this?"]),
}
