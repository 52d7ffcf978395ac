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

# The extra train-split phrasings below are appended to `TEMPLATES[key]["train"]` in the order of the loop after
# them. That order (of the lists, and of the phrasings in each) feeds the seeded data stream, so the replay tests
# and the model card's numbers depend on it: do not reorder them (new wording changes the stream anyway, so it goes
# in a new list appended last). They are written as varied everyday phrasings, not derived from the held-out pools;
# the disjointness test (`tests/test_synthetic.py`) covers them like the rest. When each list was added, and why,
# is in docs/training-notes.md.

# Everyday paraphrases of every question ("What's ...", "Could you ...", "Please tell me ...", "{obj}: what ...?"):
# a tiny model trained on four or five phrasings per question keys on the exact strings and misreads new ones.
_TRAIN_EVERYDAY: dict[str, list[str]] = {
    "color": ["What's the color of {obj}?", "Color of {obj}?", "Could you name the color of {obj}?",
              "Do you know the color of {obj}?", "Look at {obj}. What color is it?", "Say which color {obj} is.",
              "What color would you call {obj}?", "I need the color of {obj}.", "{obj}: what color?",
              "Which color do you see for {obj}?", "Please tell me the color of {obj}.",
              "What color is {obj} painted?", "Give me the color of {obj}."],
    "shape": ["What's the shape of {obj}?", "Shape of {obj}?", "Could you name the shape of {obj}?",
              "Do you know what shape {obj} is?", "Look at {obj}. What shape is it?", "Say which shape {obj} is.",
              "What would you call {obj}?", "I need the shape of {obj}.", "{obj}: what shape?",
              "Which kind of shape do you see for {obj}?", "Please tell me the shape of {obj}.",
              "What sort of figure is {obj}?", "Give me the shape of {obj}."],
    "position": ["Where's {obj}?", "Where can you see {obj}?", "Where in the image is {obj}?",
                 "Position of {obj}?", "Could you say where {obj} is?", "Do you know where {obj} is?",
                 "Where is {obj} placed?", "Where does {obj} sit in the picture?", "{obj}: where is it?",
                 "In what area of the picture is {obj}?", "Please tell me where {obj} is.",
                 "What part of the image has {obj}?", "Give me the location of {obj}."],
    "count": ["How many shapes?", "Number of shapes?", "Could you count the shapes?", "How many things are shown?",
              "Count the objects in the picture.", "How many figures are in the image?",
              "Please count the shapes.", "How many shapes are in this picture?", "Give me the shape count.",
              "How many objects do you see here?", "Do you know how many shapes there are?"],
    "number": ["What's the number?", "Read the number in the picture.", "Which number is written here?",
               "Could you read the number?", "What number do you see?", "Please read the number.",
               "What is the number in the image?", "Number shown?", "Give me the number that is written."],
    "text": ["What's the word?", "Read the word.", "Which word is written here?", "Could you read the word?",
             "What word do you see?", "Please read the text.", "What does the image say?", "Word shown?",
             "Give me the word that is written.", "Read the text in the picture."],
    "beep_count": ["How many beeps?", "Number of beeps?", "Could you count the beeps?",
                   "How many beeps are in the recording?", "Count the beeps you hear.", "Please count the beeps.",
                   "How many beeps does the audio have?", "How often does it beep?",
                   "Give me the number of beeps.", "How many beeps are in this sound?"],
    "pitch": ["High or low?", "Is it a high or a low beep?", "Are these high or low beeps?",
              "Could you tell if the beeps are high or low?", "Is the sound high or low?", "Pitch: high or low?",
              "Please say whether the tone is high or low.", "Are the tones high pitched or low pitched?",
              "Is this beep high or low?"],
    "spoken_word": ["What's the word?", "Which word do you hear?", "What word is in the audio?",
                    "Could you tell me the spoken word?", "What is being said?", "What does the voice say?",
                    "Please transcribe the word.", "Which word does the speaker say?", "Say the word you hear.",
                    "What word is spoken?"],
    "video_move": ["How does the shape move?", "Where does the shape go?", "What direction is the shape going?",
                   "Which way does the shape go?", "Could you describe how the shape moves?",
                   "What is the shape's motion?"],
    "video_size": ["What happens to the size of the shape?", "Does the shape grow or shrink?",
                   "Is the shape getting larger or smaller?", "Could you describe how the shape changes?",
                   "What is the shape's motion?"],
    "video_beeps": ["How many beeps in the video?", "Could you count the beeps in the video?",
                    "How many beeps does the clip have?", "Please count the beeps in this video.",
                    "How often does the video beep?", "Number of beeps in the clip?"],
    "followup_color": ["And the color?", "What about its color?", "Its color?", "And which color?",
                       "What color?", "And the color of it?"],
    "followup_shape": ["And the shape?", "What about its shape?", "Its shape?", "And which shape?",
                       "What shape?", "And the shape of it?"],
    "followup_position": ["And the position?", "What about its position?", "Its position?", "And where?",
                          "Where?", "Where is that one?"],
    "caption_image": ["Caption this image.", "What is shown?", "Describe what you see.", "Describe this picture.",
                      "What's in the image?", "Please describe the image."],
    "caption_video": ["Caption this video.", "Describe what happens.", "Describe this clip.",
                      "What's in the video?", "Please describe the video."],
    "transcript": ["Transcribe this.", "What is in the audio?", "Describe the audio.", "What's in this sound?",
                   "Please transcribe the recording."],
}
# Other words for what is asked ("Which figure ...", "What outline ...", "Which side ...", "Shapes: how many?"), so the
# question type is read from more than one key word: a shape question must not get a position answer.
_TRAIN_OTHER_WORDS: dict[str, list[str]] = {
    "color": ["Tell me which color {obj} has.", "Which color is used for {obj}?", "What color do you see on {obj}?",
              "Color of {obj}, please.", "How is {obj} colored?", "What color is {obj} drawn in?",
              "Which color would you say {obj} is?"],
    "shape": ["Tell me what shape {obj} has.", "Which shape does {obj} have?", "What geometric shape is {obj}?",
              "Which figure is {obj}?", "How would you describe the shape of {obj}?", "What outline does {obj} have?",
              "Is {obj} a circle, a square or another shape?", "What shape does {obj} look like?"],
    "position": ["Where exactly is {obj}?", "Which side is {obj} on?", "Where do you find {obj}?",
                 "Tell me where {obj} appears.", "Where would I find {obj} in the picture?",
                 "Point out where {obj} is.",
                 "Where does {obj} appear?"],
    "count": ["Count how many shapes there are.", "How many figures do you count?", "How many shapes are drawn?",
              "How many items are in this image?", "Shapes: how many?", "How many things are in the picture?",
              "What is the shape count here?"],
    "number": ["Which number is this?", "What number is in the picture?", "What digits are shown?",
               "Read out the number.", "What number is displayed?", "What is the number here?"],
    "beep_count": ["How many beeps can be heard?", "Count how many beeps there are.",
                   "How many times do you hear a beep?", "What's the beep count?",
                   "How many beep sounds are there?", "Beeps: how many?"],
}
# Motion questions that also name the video or clip ("In this video, ...", "Watch the clip: ..."), so that naming
# the clip does not turn a motion question into a caption request.
_TRAIN_MOTION_IN_CLIP: dict[str, list[str]] = {
    "video_move": ["What is the shape doing in the video?", "How does the shape move in this clip?",
                   "In this video, where does the shape go?", "Watch the clip: which way does the shape move?",
                   "What movement does the shape make in the video?", "Which direction does the object travel?",
                   "Where is the object going in this video?", "Tell me how the shape moves."],
    "video_size": ["What is the shape doing in the video?", "How does the shape change in this clip?",
                   "In this video, does the shape get larger?", "Watch the clip: what happens to the shape's size?",
                   "Is the object in the video getting bigger?", "Does the shape in this clip become smaller?",
                   "Tell me how the shape changes."],
}
# Count questions built on the nouns "number", "total" and "count", several opening with "What's": many refusal
# prompts open with "What's the ...", and a count question worded that way must still read as a count.
_TRAIN_COUNT_NOUNS: dict[str, list[str]] = {
    "count": ["What's the number of shapes?", "What's the count of figures in the picture?",
              "How many objects are there in total?", "In total, how many shapes are there?",
              "What's the shape total?", "Total number of figures?", "Tell me the count of items in the image.",
              "What's the number of things in this image?", "How many items can you see in total?",
              "What is the total count of shapes?", "Give me the number of objects.",
              "What's the amount of shapes in the image?"],
}
# Beep counts with other nouns for a beep ("tones", "sounds", "pips", "signals"): users also call beeps "tones",
# and otherwise the only questions with that word ask for the pitch.
_TRAIN_BEEP_NOUNS: dict[str, list[str]] = {
    "beep_count": ["How many tones do you hear?", "Count the tones.", "How many tones are in the audio?",
                   "Number of tones?", "How many sounds do you hear?", "Count the sounds in the recording.",
                   "How many pips are there?", "How many signals can you hear?", "What's the tone count?",
                   "How many short sounds are in this clip?"],
    "video_beeps": ["How many tones are in the video?", "Count the tones in the clip.",
                    "How many sounds does the video make?"],
}
# Position questions with "whereabouts" and "which region / area / part of the image contains ...", wordings
# that the other position questions lack.
_TRAIN_POSITION_REGIONS: dict[str, list[str]] = {
    "position": ["Whereabouts in the picture does {obj} sit?", "Whereabouts can {obj} be seen?",
                 "Which region of the image contains {obj}?", "What area of the picture holds {obj}?",
                 "Which part of the image shows {obj}?", "Where is {obj} found in the image?"],
}
for _more in (_TRAIN_EVERYDAY, _TRAIN_OTHER_WORDS, _TRAIN_MOTION_IN_CLIP, _TRAIN_COUNT_NOUNS, _TRAIN_BEEP_NOUNS,
              _TRAIN_POSITION_REGIONS):
    for _key, _extra in _more.items():
        TEMPLATES[_key]["train"] = TEMPLATES[_key]["train"] + _extra

# Words a user puts around a question (train split only, `synthetic._template`).
TRAIN_PREFIXES = ("Please, ", "Hey, ", "OK, ", "So, ", "Quick question: ", "Hi! ", "One more thing: ", "Now, ",
                  "Hmm, ", "Question: ")
TRAIN_SUFFIXES = (" Thanks.", " Please answer briefly.", " Just one word.", " Thank you!", " Short answer please.")

CAPABILITIES = ("I can look at pictures of simple shapes and tell you their color, shape, position and how "
                "many there are, read numbers and short words, listen to beeps and spoken words, and watch "
                "simple videos of moving shapes.")
REFUSAL = ("I can only answer questions about simple shapes, numbers and words in pictures, beeps and "
           "spoken words in audio, and simple videos of moving shapes.")

# intent -> (prompt pools, fixed answer)
CHITCHAT: dict[str, tuple[dict[str, list[str]], str]] = {
    "greeting": (_p(["hi", "hello", "hey", "good morning", "hello there", "hey!", "hi, how are you?",
                          "good afternoon", "greetings", "yo", "morning!"], ["hi there", "hello, how are you?", "good evening"]),
                 "Hello! " + CAPABILITIES),
    "capabilities": (_p(["What can you do?", "help", "What do you do?", "What are you able to do?",
                              "What are you good at?", "How do I use you?", "what can I ask you?",
                              "What do you know how to do?", "Can you help me?", "What are your skills?"],
                        ["What are your abilities?", "How can you help me?", "What kinds of things can you do?"]),
                     CAPABILITIES),
    "identity": (_p(["Who are you?", "What is your name?", "What's your name?", "Who am I talking to?",
                          "Introduce yourself.", "Are you a bot?"], ["What are you?", "Tell me about yourself."]),
                 "I am a small assistant. " + CAPABILITIES),
    "thanks": (_p(["thanks", "thank you", "thank you so much", "great, thanks", "many thanks", "thx",
                        "ok thank you"], ["thanks a lot", "cheers, thank you!"]), "You're welcome!"),
}

# Out-of-world prompts per medium. As with the train phrasings above, the order of each pool feeds the seeded data
# stream, so do not reorder it; the commented groups were appended later (docs/training-notes.md).
REFUSAL_PROMPTS: dict[str, dict[str, list[str]]] = {
    "text": _p(["What is the capital of France?", "Write me a poem.", "Who won the world cup?", "Tell me a joke.",
                "Translate hello into Spanish.", "What is the stock price of Apple?",
                "How far is the moon?", "Explain quantum physics.", "Write an email to my boss.",
                "What year did the war end?", "Recommend a good movie.", "What is 17 times 23?",
                "Summarize this article for me.", "Who is the president?", "Give me a recipe for cake.",
                "How do I fix my car?", "What's the best programming language?", "What is the tallest mountain?",
                "Can you write code for a website?", "How many people live in China?", "What time is it?",
                "Plan my vacation.", "Solve 3x + 5 = 20.", "What's the meaning of life?",
                "Tell me about the Roman empire.", "Write a song about love.", "How do airplanes fly?",
                "Which team will win tonight?", "Give me investment advice.", "What is the speed of light?",
                "Can you book a flight for me?", "Teach me French.", "Debug my python code.",
                "What is photosynthesis?", "Who invented the telephone?",
                # everyday "how do I / can I ..." requests and other questions outside this world
                "How do I bake bread?", "How can I learn to swim?", "How do I change a tire?",
                "How do I make coffee?", "How can I lose weight?", "How do I tie a tie?", "How do I get to the station?",
                "How can I sleep better?", "How do I grow tomatoes?", "How do I reset my password?",
                "What should I eat for dinner?", "Where can I buy shoes?", "Who painted the Mona Lisa?",
                "Why is the sky blue?", "Tell me a fun fact.", "What's the best pizza topping?"],
               ["Who wrote Hamlet?", "What's the weather like tomorrow?", "Write a short story about a dragon.",
                "How do I cook pasta?"]),
    "image": _p(["What breed is this dog?", "Whose face is this?", "What brand is this car?",
                 "What city is this photo from?",
                "Is this person happy?", "What animal is in the photo?", "How old is this building?",
                "What is the price of this item?", "Where was this picture taken?", "Is this photo real or fake?",
                "What is the name of this actor?", "How much does this house cost?", "What plant is this?",
                "Which country's flag is this?", "What model of phone is this?", "What is this person wearing?",
                "Rate this selfie.", "What material is this table made of?", "Which movie is this scene from?",
                # food, art and named things in a photo
                "What dish is this?", "What fruit is this?", "Is this meal healthy?", "How many calories are in this?",
                "Who drew this?", "What style of art is this?", "What is this dog's name?", "Is this cake tasty?",
                "What tree is this?", "Which museum is this painting in?",
                # "what <real thing> is in/on the <real place>?", which reads like a question about the shapes
                "What drink is in the glass?", "What is she eating?", "What vegetable is on the table?",
                "What is in the bowl?", "Which fruit is on the table?", "What meal is being served?",
                "What toy is on the floor?", "What book is on the shelf?"],
                ["What kind of bird is this?", "Which painter made this?", "What food is on the plate?"]),
    "audio": _p(["Who is the singer?", "What song is this?", "What instrument is playing?",
                "What language is this?", "Who is speaking?", "What mood is this music?",
                "Is this a man or a woman?", "What accent does the speaker have?", "Is this song popular?",
                "Who composed this piece?", "What album is this from?", "What is the tempo in beats per minute?",
                "What key is this music in?", "Is the speaker angry?", "Is this a live recording?",
                "What year was this recorded?", "Which radio station is this?",
                # artists, labels, genres and lyrics
                "Which artist sang this?", "Who recorded this track?", "What band is playing?",
                "Who wrote this song?", "What record label released this?", "Is this jazz or rock?",
                "What are the lyrics?", "Who is the drummer?", "Which concert is this from?",
                # who made, performed or recorded it (must not get the clip's caption)
                "Which group performed this?", "Who is the musician here?", "What orchestra is this?",
                "Which studio made this recording?", "Who produced this track?", "Which choir is singing?",
                "What group made this song?", "Who is playing the guitar?", "Which label put out this record?",
                "Who performed this piece?",
                # the band itself ("Which band ...")
                "Which band is this?", "Name the band.", "What is the name of this band?", "Who is the band?",
                "Which singer recorded this?", "Which artist is this?", "Who are the performers?",
                "What band made this track?"],
                ["Which band recorded this?", "What music genre is this?"]),
}
